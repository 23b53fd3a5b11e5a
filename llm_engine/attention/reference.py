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


def _derived(meta: AttentionMetadata, bs: int, device: torch.device) -> dict:
    """Gather index, masks and padding maps of one step: built by the first layer, reused by the rest."""
    c = meta.derived
    if c.get("bs") == bs:
        return c
    qsl = meta.query_start_loc.long()
    qlens = qsl[1:] - qsl[:-1]
    b, t = qlens.numel(), int(qsl[-1])
    nblk = (meta.max_seq_len + bs - 1) // bs
    s = nblk * bs  # keys padded to whole blocks (masked): no slicing copy of the gathered context
    seq_lens = meta.seq_lens.long()
    c.update(bs=bs, b=b, s=s, bt=meta.block_tables[:, :nblk].reshape(-1).long())
    kpos = torch.arange(s, device=device)
    if meta.max_query_len == 1:
        c["mask"] = (kpos[None, :] < seq_lens[:, None])[:, None, None, :]
    else:
        b_idx = torch.repeat_interleave(torch.arange(b, device=device), qlens, output_size=t)
        i_idx = torch.arange(t, device=device) - qsl[b_idx]
        qpos = (seq_lens - qlens)[:, None] + torch.arange(meta.max_query_len, device=device)[None]
        c.update(b_idx=b_idx, i_idx=i_idx, mask=(kpos[None, None, :] <= qpos[:, :, None])[:, None])
    return c


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    t, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    c = _derived(meta, bs, q.device)
    b, s = c["b"], c["s"]
    # index_select, not k_cache[bt]: advanced indexing is orders of magnitude slower here.
    k = k_cache.index_select(0, c["bt"]).view(b, s, hkv, d).transpose(1, 2).to(q.dtype)
    v = v_cache.index_select(0, c["bt"]).view(b, s, hkv, d).transpose(1, 2).to(q.dtype)
    if meta.max_query_len == 1:  # decode only: no padding needed
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=c["mask"], scale=scale, enable_gqa=True)
        return out[:, :, 0, :]
    b_idx, i_idx = c["b_idx"], c["i_idx"]
    qp = q.new_zeros(b, meta.max_query_len, h, d)
    qp[b_idx, i_idx] = q
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=c["mask"], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[b_idx, i_idx]
