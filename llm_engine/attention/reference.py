"""PyTorch reference of paged attention: the CPU back end and the oracle the Triton kernels are tested against.

Vectorised over the batch: queries are padded to ``[B, max_q]``, each sequence's context is
gathered from its block table to ``[B, max_seq]``, and a causal mask by absolute position
(``key_pos <= query_pos``) covers prefill chunks over a cached prefix and decodes alike. The
product itself is ``scaled_dot_product_attention`` with grouped-query heads. Sequences are split
into up to three groups of similar context length (:func:`length_groups`) so a batch mixing short
and long contexts does not pad every row to the longest one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llm_engine.attention.metadata import AttentionMetadata


GROUP_OVERHEAD = 512  # key slots one extra attention call is worth (its fixed cost, measured on CPU)


def length_groups(seq_lens: np.ndarray, overhead: int = GROUP_OVERHEAD) -> list[np.ndarray]:
    """Split sequences into at most three groups of similar length, so that short contexts are
    not padded to the longest one: minimises ``sum(len(group) * max_len(group)) + overhead *
    groups`` over contiguous runs of the length order (vectorised search over split points)."""
    order = np.argsort(seq_lens, kind="stable")
    ln = seq_lens[order].astype(np.int64)
    b = len(ln)
    best_cost, best_cuts = b * int(ln[-1]) + overhead, ()
    if b >= 2:
        i = np.arange(1, b)  # group 1 = [0, i), group 2 = [i, b)
        c2 = i * ln[i - 1] + (b - i) * ln[-1] + 2 * overhead
        k = int(np.argmin(c2))
        if c2[k] < best_cost:
            best_cost, best_cuts = int(c2[k]), (int(i[k]),)
    if b >= 3:
        i, j = np.meshgrid(np.arange(1, b), np.arange(1, b), indexing="ij")
        ok = i < j
        c3 = i * ln[i - 1] + (j - i) * ln[j - 1] + (b - j) * ln[-1] + 3 * overhead
        c3 = np.where(ok, c3, np.iinfo(np.int64).max)
        k = int(np.argmin(c3))
        if c3.flat[k] < best_cost:
            best_cuts = (int(i.flat[k]), int(j.flat[k]))
    return np.split(order, best_cuts)


def _group(meta: AttentionMetadata, idx: torch.Tensor | None, bs: int, device: torch.device) -> dict:
    """Gather index and mask for the sequences ``idx`` (all when ``None``)."""
    qsl = meta.query_start_loc.long()
    qlens, starts, seq_lens, tables = qsl[1:] - qsl[:-1], qsl[:-1], meta.seq_lens.long(), meta.block_tables
    if idx is not None:
        qlens, starts, seq_lens, tables = qlens[idx], starts[idx], seq_lens[idx], tables[idx]
    b = qlens.numel()
    max_q, max_s = int(qlens.max()), int(seq_lens.max())
    nblk = (max_s + bs - 1) // bs
    s = nblk * bs  # keys padded to whole blocks (masked): no slicing copy of the gathered context
    g = dict(b=b, s=s, max_q=max_q, bt=tables[:, :nblk].reshape(-1).long())
    kpos = torch.arange(s, device=device)
    if max_q == 1:
        g["rows"] = starts  # one token per sequence
        g["mask"] = (kpos[None, :] < seq_lens[:, None])[:, None, None, :]
    else:
        t = int(qlens.sum())
        b_idx = torch.repeat_interleave(torch.arange(b, device=device), qlens, output_size=t)
        i_idx = torch.arange(t, device=device) - (qlens.cumsum(0) - qlens)[b_idx]
        qpos = (seq_lens - qlens)[:, None] + torch.arange(max_q, device=device)[None]
        g.update(rows=starts[b_idx] + i_idx, b_idx=b_idx, i_idx=i_idx,
                 mask=(kpos[None, None, :] <= qpos[:, :, None])[:, None])
    return g


def _derived(meta: AttentionMetadata, bs: int, device: torch.device) -> list[dict]:
    """Per-step groups (gather index, mask, token rows): built by the first layer, reused by the rest."""
    c = meta.derived
    if c.get("bs") != bs:
        groups = length_groups(meta.seq_lens.cpu().numpy(), GROUP_OVERHEAD)
        if len(groups) == 1:
            c["groups"] = [_group(meta, None, bs, device)]
        else:
            c["groups"] = [_group(meta, torch.from_numpy(g).to(device), bs, device) for g in groups]
        c["bs"] = bs
    return c["groups"]


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: dict, scale: float) -> torch.Tensor:
    """Attention of one group's query rows ``q`` ``[t, H, D]`` over its gathered context."""
    b, s, hkv, d = g["b"], g["s"], k_cache.shape[2], k_cache.shape[3]
    # index_select, not k_cache[bt]: advanced indexing is orders of magnitude slower here.
    k = k_cache.index_select(0, g["bt"]).view(b, s, hkv, d).transpose(1, 2).to(q.dtype)
    v = v_cache.index_select(0, g["bt"]).view(b, s, hkv, d).transpose(1, 2).to(q.dtype)
    if g["max_q"] == 1:  # decode only: no query padding needed
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=g["mask"], scale=scale, enable_gqa=True)
        return out[:, :, 0, :]
    b_idx, i_idx = g["b_idx"], g["i_idx"]
    qp = q.new_zeros(b, g["max_q"], q.shape[1], d)
    qp[b_idx, i_idx] = q
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=g["mask"], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[b_idx, i_idx]


def reference_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    groups = _derived(meta, k_cache.shape[1], q.device)
    if len(groups) == 1:
        return _attend(q, k_cache, v_cache, groups[0], scale)
    out = torch.empty_like(q)
    for g in groups:  # at most three calls per layer, whatever the batch size
        out[g["rows"]] = _attend(q[g["rows"]], k_cache, v_cache, g, scale)
    return out
