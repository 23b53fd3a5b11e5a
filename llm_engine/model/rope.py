"""Rotary position embedding with the common context-extension variants.

``inv_freq`` is computed once; cos/sin are produced per step for the flat positions of the batch,
so chunked prefill and decode tokens of different sequences rotate correctly in one call.
Variants follow the Hugging Face definitions so converted checkpoints behave identically:
``linear`` (position interpolation), ``dynamic`` (NTK-aware base growth), ``llama3`` (per-band
wavelength scaling) and ``yarn`` (ramped interpolation plus an attention temperature).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _default(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None,
                  max_pos: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq, attention_scaling)`` for the configured variant."""
    if not scaling:
        return _default(dim, theta), 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return _default(dim, theta) / factor, 1.0
    if kind == "dynamic":
        # NTK-aware: grow the base once sequences exceed the trained context (HF semantics).
        orig = scaling.get("original_max_position_embeddings", max_pos)
        n = max(seq_len or orig, orig)
        if n > orig:
            theta = theta * ((factor * n / orig) - (factor - 1)) ** (dim / (dim - 2))
        return _default(dim, theta), 1.0
    if kind == "llama3":
        inv = _default(dim, theta)
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        orig = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = orig / low, orig / high
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (orig / wl - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wl >= high_wl) & (wl <= low_wl)
        return torch.where(mid, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings", max_pos)
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
        mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def corr(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        lo = max(math.floor(corr(beta_fast)), 0)
        hi = min(math.ceil(corr(beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        ramp = ((torch.arange(dim // 2).float() - lo) / (hi - lo)).clamp(0, 1)
        extra_mask = 1 - ramp
        return inter * (1 - extra_mask) + extra * extra_mask, float(mscale)
    raise ValueError(f"unsupported rope_type {kind!r}")


class RotaryEmbedding(torch.nn.Module):
    """Applies RoPE (rotate-half layout, as Hugging Face Llama) at arbitrary flat positions."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int):
        super().__init__()
        inv, self.attention_scaling = rope_inv_freq(head_dim, theta, scaling, max_pos)
        self.register_buffer("inv_freq", inv, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, signed sin)`` ``[T, 1, D]`` for :func:`rope_apply`: computed once per step."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = emb.sin() * self.attention_scaling
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)[:, None, :]
        return cos, sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, Hkv, D], positions: [T]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(q.dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x`` ``[T, heads, D]`` with :meth:`RotaryEmbedding.cos_sin`'s tables: rotate-half
    as a roll times a sine whose first half is negated (two fewer ops than slicing and concat)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
