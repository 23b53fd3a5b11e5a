"""Paged attention: one metadata record describes a mixed batch of prefill chunks and decodes.

Every query token belongs to one sequence; its keys are the sequence's whole context so far, read
through the block table from the paged KV pool (the step's new keys are written there first), with
causal masking by absolute position. Back ends: ``reference`` (PyTorch, CPU) and ``triton``.
"""

from __future__ import annotations

import torch

from llm_engine.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata", "paged_attention", "write_kv"]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values (``[T, Hkv, D]``) into the paged cache."""
    hkv, d = k.shape[-2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, backend: str = "torch") -> torch.Tensor:
    """Attention of ``q`` ``[T, H, D]`` over the paged context; returns ``[T, H, D]``."""
    if backend == "triton":
        from llm_engine.attention.triton_kernels import triton_paged_attention
        return triton_paged_attention(q, k_cache, v_cache, meta, scale)
    from llm_engine.attention.reference import reference_paged_attention
    return reference_paged_attention(q, k_cache, v_cache, meta, scale)
