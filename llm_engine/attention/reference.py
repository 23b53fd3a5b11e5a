"""PyTorch reference of paged attention: the CPU back end and the oracle the Triton kernels are tested against.

Vectorised over the batch: queries are padded to ``[B, max_q]``, each sequence's context is
gathered from its block table to ``[B, max_seq]``, and a causal mask by absolute position
(``key_pos <= query_pos``) covers prefill chunks over a cached prefix and decodes alike.
"""

from __future__ import annotations

import torch

from llm_engine.attention import AttentionMetadata


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    t, h, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    g = h // hkv
    qsl = meta.query_start_loc.long()
    qlens = qsl[1:] - qsl[:-1]
    b = qlens.numel()
    maxq, s = meta.max_query_len, meta.max_seq_len
    b_idx = torch.repeat_interleave(torch.arange(b, device=q.device), qlens)
    i_idx = torch.arange(t, device=q.device) - qsl[b_idx]
    qp = q.new_zeros(b, maxq, hkv, g, d)
    qp[b_idx, i_idx] = q.view(t, hkv, g, d)
    nblk = (s + bs - 1) // bs
    bt = meta.block_tables[:, :nblk].long()
    k = k_cache[bt].reshape(b, nblk * bs, hkv, d)[:, :s].to(q.dtype)
    v = v_cache[bt].reshape(b, nblk * bs, hkv, d)[:, :s].to(q.dtype)
    scores = torch.einsum("bqkgd,bskd->bkgqs", qp, k).float() * scale
    qpos = (meta.seq_lens.long() - qlens)[:, None] + torch.arange(maxq, device=q.device)[None]
    mask = torch.arange(s, device=q.device)[None, None, :] <= qpos[:, :, None]
    scores = scores.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).to(q.dtype)
    out = torch.einsum("bkgqs,bskd->bqkgd", scores, v)
    return out[b_idx, i_idx].reshape(t, h, d)
