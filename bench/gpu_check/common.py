"""What the checks share: the run's settings, device timing, the memory roofline, the model folders
and the shape of a result line."""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.harness import timed

log = logging.getLogger("bench.gpu_check")

# Tolerances of a result against its fp32 oracle, by the dtype the checked path computes in.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Setup:
    """One run's settings. ``tiny``: CPU-sized shapes (automatic without CUDA). ``perturb``: every
    check compares against a reference shifted beyond its tolerance, so every check must fail."""

    device: torch.device
    tiny: bool
    perturb: bool
    workdir: Path
    repeats: int
    seed: int = 0
    models: dict[str, "ModelFolder"] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The engine's ``dtype="auto"``: bf16 on CUDA, fp32 on the CPU."""
        return torch.bfloat16 if self.cuda else torch.float32

    @property
    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        interp = " (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        return f"cpu{interp}"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def release(self) -> None:
        """Frees what the last engine or model held (engines keep reference cycles)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def time_ms(setup: Setup, fn: Callable[[], Any], inner: int = 1, warmup: int = 1) -> float:
    """Median milliseconds of one ``fn()`` over ``setup.repeats`` timed rounds of ``inner`` calls
    each, the device synchronised around every round (bench.harness.timed takes the median)."""

    def round_() -> None:
        for _ in range(inner):
            fn()
        setup.sync()

    setup.sync()
    med, _, _ = timed(round_, setup.repeats, warmup=warmup)
    return med * 1000 / inner


_BANDWIDTH: dict[str, tuple[float, str]] = {}


def memory_bandwidth(setup: Setup) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): the card's peak HBM bandwidth where bench.llm knows
    the card, else a device copy measured in this run (bench.llm.memory_bandwidth)."""
    key = str(setup.device)
    if key not in _BANDWIDTH:
        from bench.llm import PEAK_HBM, memory_bandwidth as measured

        peak = None
        if setup.cuda:
            name = torch.cuda.get_device_name(setup.device)
            peak = next((v for k, v in PEAK_HBM.items() if k in name), None)
            source = f"{name} peak HBM"
        if peak is None:
            peak = measured(setup.device.type, mib=32 if setup.tiny else 256)
            source = "copy bandwidth measured in this run (read + write)"
        _BANDWIDTH[key] = (peak, source)
    return _BANDWIDTH[key]


def result(check: str, setup: Setup, ok: bool, reference: str, **figures: Any) -> dict:
    """One result line: ``check``, ``device``, ``ok``, the figures, ``reference``."""
    return {"check": check, "device": setup.device_name, "ok": bool(ok), "tiny": setup.tiny, **figures,
            "reference": reference}


def targets(setup: Setup, **named: tuple[float | None, float]) -> dict | str:
    """The issue's speed targets, ``name=(value, at_least)``: value, target, met. Not judged at
    tiny shapes, where no speed figure means anything."""
    if setup.tiny:
        return "not judged at tiny shapes"
    return {k: {"value": rounded(v), "target": t, "met": v is not None and v >= t} for k, (v, t) in named.items()}


def rounded(x: float | None, digits: int = 4) -> float | None:
    """``x`` to ``digits`` significant digits (None stays None)."""
    return None if x is None else float(f"{x:.{digits}g}")


# ---- model folders ---------------------------------------------------------------------------
@dataclass
class ModelFolder:
    """A checkpoint folder the engine and transformers both load, with what a decode step reads."""

    path: Path
    label: str
    params: int  # unique parameters (tied head counted once)
    weight_bytes_per_step: int  # every weight a decode step reads (not the input embedding rows)
    kv_bytes_per_token: int  # K and V of one token, all layers
    dtype: torch.dtype

    @classmethod
    def read(cls, path: Path, label: str, dtype: torch.dtype) -> "ModelFolder":
        from safetensors import safe_open

        from llm_engine.config import ModelConfig

        cfg = ModelConfig.from_pretrained(path)
        shapes: dict[str, int] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    n = 1
                    for s in sf.get_slice(name).get_shape():
                        n *= s
                    shapes[name] = n
        params = sum(shapes.values())
        embed = shapes.get("model.embed_tokens.weight", 0)
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in shapes
        # An untied input embedding is read a row per token, not whole; a tied one is the head.
        read = params - (0 if tied else embed)
        size = torch.tensor([], dtype=dtype).element_size()
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * size
        return cls(Path(path), label, params, read * size, kv, dtype)


SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
# bench.llm draws prompt ids below 15000, so the tiny model's vocabulary stays above that.
TINY_SHAPE = dict(vocab_size=16000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def write_random_llama(path: Path, shape: dict, seed: int, dtype: torch.dtype, device: torch.device,
                       max_positions: int = 2048) -> Path:
    """A random Llama folder (no tokenizer: the checks feed token ids), initialised on ``device``
    (a 1B model initialises in seconds on a GPU, not a minute on the CPU) and saved in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=max_positions, eos_token_id=None, bos_token_id=None,
                      pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    del model
    return path


def model_folder(setup: Setup, name: str) -> ModelFolder:
    """``tiny`` (~2M parameters), ``smollm2`` (the packaged SmolLM2-135M-Instruct, converted once;
    where the package is missing, a random model of its shape) or ``random_1b`` (bench llm's CUDA
    shape, ~1.1B; the tiny shape with ``--tiny``). Built once per run under ``setup.workdir``."""
    if name in setup.models:
        return setup.models[name]
    if name == "smollm2":
        try:
            from llm_engine.convert import smollm2_path

            folder = ModelFolder.read(smollm2_path(), "SmolLM2-135M-Instruct", setup.dtype)
        except (FileNotFoundError, ImportError, OSError) as exc:
            log.warning("SmolLM2 unavailable (%s): a random model of its shape stands in", exc)
            path = write_random_llama(setup.workdir / "smollm2-shape", SMOLLM2_SHAPE, setup.seed, setup.dtype,
                                      setup.device)
            folder = ModelFolder.read(path, f"random weights, SmolLM2-135M shape (SmolLM2 unavailable: {exc})",
                                      setup.dtype)
    elif name == "random_1b" and not setup.tiny:
        from bench.llm import model_shape

        path = write_random_llama(setup.workdir / "random-1b", dict(model_shape(True), tie_word_embeddings=False),
                                  setup.seed, setup.dtype, setup.device)
        folder = ModelFolder.read(path, "random Llama, bench llm's CUDA shape", setup.dtype)
    elif name in ("tiny", "random_1b"):
        path = setup.workdir / "tiny"
        if not (path / "config.json").exists():
            write_random_llama(path, TINY_SHAPE, setup.seed, torch.float32, torch.device("cpu"))
        folder = ModelFolder.read(path, "random Llama, tiny shape", setup.dtype)
    else:
        raise KeyError(name)
    setup.models[name] = folder
    return folder


def write_line(line: dict, out_file: Path | None) -> None:
    """Prints one JSON line (flushed) and appends it to ``out_file``."""
    text = json.dumps(line, default=str)
    print(text, flush=True)
    if out_file is not None:
        with out_file.open("a") as f:
            f.write(text + "\n")
