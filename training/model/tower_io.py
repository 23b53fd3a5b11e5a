"""The tower's wire form: safetensors bytes with its :class:`ModelConfig` in the metadata, so a
consumer (serving, a checkpoint) rebuilds it from one message."""

from __future__ import annotations

import json
from typing import Mapping

import torch

from training.model.config import ModelConfig
from training.model.tower import DenseTower

__all__ = ["tower_to_safetensors", "tower_from_safetensors"]

_CONFIG_KEY = "headwater.model_config"


def tower_to_safetensors(tower: DenseTower, metadata: Mapping[str, str] | None = None) -> bytes:
    """The tower's weights as safetensors bytes, its :class:`ModelConfig` in the metadata."""
    from safetensors.torch import save

    meta = {_CONFIG_KEY: tower.cfg.to_json(), **(metadata or {})}
    tensors = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    return save(tensors, metadata=meta)


def tower_from_safetensors(data: bytes) -> tuple[DenseTower, dict[str, str]]:
    """Rebuilds a tower from :func:`tower_to_safetensors` bytes; returns it and the metadata."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = _safetensors_metadata(data)
    except Exception as exc:  # safetensors raises its own error types on garbage
        raise ValueError(f"not a safetensors tower: {exc}") from None
    if _CONFIG_KEY not in meta:
        raise ValueError("safetensors bytes carry no model config")
    try:
        cfg = ModelConfig.from_json(meta[_CONFIG_KEY])
        # Shapes first, on the meta device (no memory): a forged config must not make us
        # allocate layers far larger than the weights the message actually carries.
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in DenseTower(cfg).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - any malformed config is one verdict
        raise ValueError(f"safetensors bytes carry an invalid model config: {exc}") from None
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"tower weights do not match config: missing {missing}, unexpected {unexpected}, "
                         f"wrong shape {bad}")
    tower = DenseTower(cfg)
    tower.load_state_dict(tensors, strict=True)
    return tower, meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """Reads the ``__metadata__`` of safetensors bytes (8-byte length + JSON header)."""
    if len(data) < 8:
        raise ValueError("truncated safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})
