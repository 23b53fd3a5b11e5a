"""Triton paged-attention kernels: decode (one query per sequence) and varlen prefill over a paged prefix.

Both read K/V block by block through the block table (``[num_blocks, block_size, Hkv, D]`` per
layer) with an online softmax in fp32, so a sequence's context never has to be contiguous.
The prefill kernel takes a mixed batch of variable-length query chunks in one launch (grid:
sequence x head x query tile); each query attends to keys at absolute positions ``<=`` its own,
which covers chunked prefill on top of cached prefix blocks. Tested against
:mod:`llm_engine.attention.reference` under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm_engine.attention.metadata import AttentionMetadata


@triton.jit
def _decode_kernel(Q, K, V, O, BT, SEQLENS, scale,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_s = tl.arange(0, BLOCK_N)
    seq_len = tl.load(SEQLENS + b)
    q = tl.load(Q + b * stride_qt + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.cdiv(seq_len, BLOCK_N)):
        blk = tl.load(BT + b * stride_bt + j).to(tl.int64)
        off = blk * stride_kb + offs_s[:, None] * stride_ks + kh * stride_kh + offs_d[None, :]
        k = tl.load(K + off, mask=d_mask[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + off, mask=d_mask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, axis=1) * scale
        s = tl.where(j * BLOCK_N + offs_s < seq_len, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(O + b * stride_qt + h * stride_qh + offs_d, (acc / l_i).to(O.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_kernel(Q, K, V, O, BT, QSL, SEQLENS, scale,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(QSL + b)
    q_len = tl.load(QSL + b + 1) - q_start
    if mt * BLOCK_M < q_len:
        kh = h // G
        seq_len = tl.load(SEQLENS + b)
        ctx0 = seq_len - q_len
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, BLOCK_N)
        m_mask = offs_m < q_len
        d_mask = offs_d < D
        q_ptr = Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptr, mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        qpos = ctx0 + offs_m
        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_end = tl.minimum(seq_len, ctx0 + (mt + 1) * BLOCK_M)
        for j in range(0, tl.cdiv(kv_end, BLOCK_N)):
            blk = tl.load(BT + b * stride_bt + j).to(tl.int64)
            off = blk * stride_kb + offs_s[:, None] * stride_ks + kh * stride_kh + offs_d[None, :]
            k = tl.load(K + off, mask=d_mask[None, :], other=0.0).to(tl.float32)
            v = tl.load(V + off, mask=d_mask[None, :], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            kpos = j * BLOCK_N + offs_s
            s = tl.where((kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < seq_len), s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        o_ptr = O + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
        tl.store(o_ptr, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Same contract as the reference: ``q`` ``[T, H, D]`` -> ``[T, H, D]``."""
    q = q.contiguous()  # the output shares q's strides; q may be a view into a fused qkv row
    t, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("last dimension must be contiguous")
    out = torch.empty_like(q)
    b = meta.seq_lens.numel()
    block_d = triton.next_power_of_2(d)
    common = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
              meta.block_tables.stride(0))
    if meta.is_decode_only:
        _decode_kernel[(b, h)](q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, scale, *common,
                               G=h // hkv, D=d, BLOCK_N=bs, BLOCK_D=block_d)
    else:
        block_m = 16
        grid = (b, h, triton.cdiv(meta.max_query_len, block_m))
        _prefill_kernel[grid](q, k_cache, v_cache, out, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                              scale, *common, G=h // hkv, D=d, BLOCK_M=block_m, BLOCK_N=bs, BLOCK_D=block_d)
    return out
