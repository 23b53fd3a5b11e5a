"""Load a Hugging Face model folder: ``config.json`` + safetensors (single file or sharded index)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from llm_engine.config import ModelConfig
from llm_engine.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)
SUPPORTED = {"llama", "qwen2", "mistral"}


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a folder, via the index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return files


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Build the model from ``config.json`` and copy every tensor in; missing weights are an error."""
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"model_type {cfg.model_type!r} not supported (supported: {sorted(SUPPORTED)})")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name in params:
                    loaded[name] = sf.get_tensor(name).to(dtype)
                elif "rotary_emb" not in name:
                    logger.debug("ignoring tensor %s", name)
    if cfg.tie_word_embeddings or "lm_head.weight" not in loaded:
        loaded["lm_head.weight"] = loaded["model.embed_tokens.weight"]
    missing = [n for n in params if n not in loaded]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rope inv_freq) were created on meta: rebuild them.
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            from llm_engine.model.rope import rope_inv_freq
            mod.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                         cfg.max_position_embeddings)[0]
    return model.to(device).eval().fuse_projections()
