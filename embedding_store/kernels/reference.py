"""PyTorch reference implementations of the kernels (the CPU path and the test oracle)."""

from __future__ import annotations

import numpy as np
import torch


def to_offsets(n_ids: int, lengths: torch.Tensor | np.ndarray | None, offsets: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """Bag boundaries as int64 offsets ``[num_bags + 1]`` from either lengths or offsets."""
    if (lengths is None) == (offsets is None):
        raise ValueError("give exactly one of lengths or offsets")
    if lengths is not None:
        lt = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, torch.Tensor) else lengths).to("cpu", torch.int64)
        if bool((lt < 0).any()):
            raise ValueError("bag lengths must be >= 0")
        off = torch.zeros(lt.numel() + 1, dtype=torch.int64)
        torch.cumsum(lt.reshape(-1), 0, out=off[1:])
    else:
        off = torch.as_tensor(np.asarray(offsets) if not isinstance(offsets, torch.Tensor) else offsets).to("cpu", torch.int64).reshape(-1)
        if off.numel() == 0 or int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()):
            raise ValueError("offsets must start at 0 and be non-decreasing (num_bags + 1 entries)")
    if int(off[-1]) != n_ids:
        raise ValueError(f"bags cover {int(off[-1])} ids but {n_ids} were given")
    return off


def embedding_bag_reference(values: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, mode: str,
                            per_sample_weights: torch.Tensor | None, default: torch.Tensor | None) -> torch.Tensor:
    num_bags = offsets.numel() - 1
    dim = values.shape[1]
    vec = values.index_select(0, rows.clamp_min(0))
    if default is not None and bool((rows < 0).any()):
        vec[rows < 0] = default
    if per_sample_weights is not None:
        vec = vec * per_sample_weights.reshape(-1, 1)
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(num_bags, device=values.device), lengths.to(values.device))
    out = torch.zeros(num_bags, dim, dtype=values.dtype, device=values.device)
    out.index_add_(0, bag, vec)
    if mode == "mean":
        out /= lengths.clamp_min(1).to(out.device, out.dtype).unsqueeze(1)
    return out


def bag_grads_to_ids(bag_grads: torch.Tensor, lengths: torch.Tensor, mode: str = "sum",
                     per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Expand pooled-bag gradients ``[num_bags, dim]`` to per-id gradients ``[n_ids, dim]``
    (the backward of :func:`embedding_bag`), for ``apply_gradients``."""
    lengths = lengths.to(bag_grads.device, torch.int64)
    g = torch.repeat_interleave(bag_grads, lengths, dim=0)
    if mode == "mean":
        g = g / torch.repeat_interleave(lengths.clamp_min(1), lengths).to(g.dtype).unsqueeze(1)
    if per_sample_weights is not None:
        g = g * per_sample_weights.to(g.device).reshape(-1, 1)
    return g


def adagrad_update_reference(values: torch.Tensor, accum: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
                             lr: float, eps: float) -> None:
    w = values.index_select(0, rows)
    a = accum.index_select(0, rows)
    a.addcmul_(grads, grads)
    w.addcdiv_(grads, a.sqrt().add_(eps), value=-lr)
    values.index_copy_(0, rows, w)
    accum.index_copy_(0, rows, a)
