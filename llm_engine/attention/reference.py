"""PyTorch reference of paged attention: the CPU back end and the oracle the Triton kernels are tested against.

Vectorised over the batch: queries are padded to ``[B, max_q]``, each sequence's context is
gathered from its block table to ``[B, max_seq]``, and a causal mask by absolute position
(``key_pos <= query_pos``) covers prefill chunks over a cached prefix and decodes alike. The
product itself is ``scaled_dot_product_attention`` with grouped-query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_engine.attention import AttentionMetadata


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    t, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    qsl = meta.query_start_loc.long()
    qlens = qsl[1:] - qsl[:-1]
    b = qlens.numel()
    maxq, s = meta.max_query_len, meta.max_seq_len
    nblk = (s + bs - 1) // bs
    bt = meta.block_tables[:, :nblk].reshape(-1).long()
    # index_select, not k_cache[bt]: advanced indexing is orders of magnitude slower here.
    k = k_cache.index_select(0, bt).view(b, nblk * bs, hkv, d)[:, :s].transpose(1, 2).to(q.dtype)
    v = v_cache.index_select(0, bt).view(b, nblk * bs, hkv, d)[:, :s].transpose(1, 2).to(q.dtype)
    kpos = torch.arange(s, device=q.device)
    if maxq == 1:  # decode only: no padding needed
        mask = (kpos[None, :] < meta.seq_lens.long()[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out[:, :, 0, :]
    b_idx = torch.repeat_interleave(torch.arange(b, device=q.device), qlens, output_size=t)
    i_idx = torch.arange(t, device=q.device) - qsl[b_idx]
    qp = q.new_zeros(b, maxq, h, d)
    qp[b_idx, i_idx] = q
    qpos = (meta.seq_lens.long() - qlens)[:, None] + torch.arange(maxq, device=q.device)[None]
    mask = (kpos[None, None, :] <= qpos[:, :, None])[:, None]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[b_idx, i_idx]
