"""Triton kernels: one program per bag (embedding-bag) / per row (Adagrad), dim in one block.

Fusing matters on the GPU: the reference gathers ``[n_ids, dim]`` to memory and then reduces it;
the fused bag kernel reads each row once and writes only ``[num_bags, dim]``. The fused Adagrad
reads value and accumulator once and writes both back, instead of gather/compute/scatter passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bag_kernel(values_ptr, rows_ptr, offsets_ptr, weights_ptr, default_ptr, out_ptr, dim,
                HAS_W: tl.constexpr, MEAN: tl.constexpr, BLOCK_D: tl.constexpr):
    bag = tl.program_id(0)
    start = tl.load(offsets_ptr + bag)
    end = tl.load(offsets_ptr + bag + 1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < dim
    dflt = tl.load(default_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(start, end):
        row = tl.load(rows_ptr + i)
        safe = tl.maximum(row, 0)
        v = tl.load(values_ptr + safe * dim + cols, mask=cmask, other=0.0)
        v = tl.where(row >= 0, v, dflt)
        if HAS_W:
            v = v * tl.load(weights_ptr + i)
        acc += v
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + bag * dim + cols, acc, mask=cmask)


def embedding_bag_triton(values: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, mode: str,
                         per_sample_weights: torch.Tensor | None, default: torch.Tensor | None) -> torch.Tensor:
    values = values.contiguous()
    num_bags = offsets.numel() - 1
    dim = values.shape[1]
    out = torch.empty(num_bags, dim, dtype=torch.float32, device=values.device)
    if num_bags == 0:
        return out
    if default is None:
        default = torch.zeros(dim, device=values.device)
    w = per_sample_weights if per_sample_weights is not None else rows  # placeholder when unused
    _bag_kernel[(num_bags,)](
        values, rows.contiguous(), offsets.to(values.device).contiguous(), w.contiguous(), default.contiguous(), out,
        dim, HAS_W=per_sample_weights is not None, MEAN=mode == "mean", BLOCK_D=triton.next_power_of_2(dim),
    )
    return out


@triton.jit
def _adagrad_kernel(values_ptr, accum_ptr, rows_ptr, grads_ptr, lr, eps, dim, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < dim
    g = tl.load(grads_ptr + i * dim + cols, mask=cmask, other=0.0)
    a = tl.load(accum_ptr + row * dim + cols, mask=cmask, other=0.0) + g * g
    w = tl.load(values_ptr + row * dim + cols, mask=cmask, other=0.0)
    w = w - lr * g / (tl.sqrt(a) + eps)
    tl.store(accum_ptr + row * dim + cols, a, mask=cmask)
    tl.store(values_ptr + row * dim + cols, w, mask=cmask)


def adagrad_update_triton(values: torch.Tensor, accum: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
                          lr: float, eps: float) -> None:
    """Rows must be distinct (the table sums duplicate ids' grads first)."""
    n = rows.numel()
    if n == 0:
        return
    if not (values.is_contiguous() and accum.is_contiguous()):
        raise ValueError("values and accumulator must be contiguous")
    dim = values.shape[1]
    _adagrad_kernel[(n,)](values, accum, rows.contiguous(), grads.contiguous().float(), float(lr), float(eps), dim,
                          BLOCK_D=triton.next_power_of_2(dim))
