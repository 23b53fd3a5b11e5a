"""Hot-path kernels: fused embedding-bag pooling and the fused sparse Adagrad update.

On CUDA tensors the Triton kernels run; elsewhere the PyTorch reference does (the Triton
kernels are also tested on CPU under ``TRITON_INTERPRET=1`` against that reference, and
:func:`triton_on_cpu` sends the product path's CPU tensors through them there).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from embedding_store.kernels.reference import (
    adagrad_update_reference,
    bag_grads_to_ids,
    embedding_bag_reference,
    to_offsets,
)

__all__ = ["adagrad_update", "bag_grads_to_ids", "embedding_bag", "to_offsets", "triton_on_cpu", "use_triton"]

_ON_CPU = False  # set by triton_on_cpu()


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors (unless HEADWATER_NO_TRITON=1 asks for the reference path); on CPU
    tensors too inside :func:`triton_on_cpu`."""
    if t.is_cuda:
        return os.environ.get("HEADWATER_NO_TRITON") != "1"
    return _ON_CPU


@contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Within it, CPU tensors take the Triton kernels too, run by Triton's interpreter: how a test
    (or ``scripts/gpu-check.sh`` without a GPU) drives a table, trainer or replica through the very
    kernel calls it makes on CUDA. Needs ``TRITON_INTERPRET=1`` set before Triton was imported;
    process-wide while it lasts (tests and checks only)."""
    global _ON_CPU
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton_on_cpu needs TRITON_INTERPRET=1 (set before Triton is imported)")
    before, _ON_CPU = _ON_CPU, True
    try:
        yield
    finally:
        _ON_CPU = before


def embedding_bag(values: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, mode: str = "sum",
                  per_sample_weights: torch.Tensor | None = None, default: torch.Tensor | None = None) -> torch.Tensor:
    """Pool ``values[rows]`` over bags ``offsets`` (num_bags + 1); rows < 0 read ``default``."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    if use_triton(values):
        from embedding_store.kernels.triton_kernels import embedding_bag_triton

        return embedding_bag_triton(values, rows, offsets, mode, per_sample_weights, default)
    return embedding_bag_reference(values, rows, offsets, mode, per_sample_weights, default)


def adagrad_update(values: torch.Tensor, accum: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
                   lr: float, eps: float) -> None:
    """In-place Adagrad on distinct ``rows`` with summed ``grads``."""
    if use_triton(values):
        from embedding_store.kernels.triton_kernels import adagrad_update_triton

        adagrad_update_triton(values, accum, rows, grads, lr, eps)
    else:
        adagrad_update_reference(values, accum, rows, grads, lr, eps)
