"""Variable-size ``all_to_all`` and the small control collectives of the lockstep loop.

gloo in torch 2.13 implements ``all_to_all_single`` with uneven split sizes (the list form
``all_to_all`` insists on equal sizes), so every exchange is two ``all_to_all_single`` calls: the
per-peer counts first (one int64 each), then the payload split by them. NCCL takes the same calls.

Nothing here pickles: structured data (slot names, model shape) travels as UTF-8 JSON bytes in
uint8 tensors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ExchangeTimer", "exchange_counts", "all_to_all_rows", "all_reduce_sum", "all_reduce_max",
           "agree_json"]


@dataclass
class ExchangeTimer:
    """Seconds spent inside exchange collectives (including waiting for slower peers)."""

    seconds: float = 0.0
    calls: int = 0
    rows_sent: int = 0


def exchange_counts(send_counts: torch.Tensor, timer: ExchangeTimer | None = None) -> torch.Tensor:
    """Each rank's ``send_counts[p]`` (rows for peer p) -> ``recv_counts[p]`` (rows from peer p)."""
    t0 = time.perf_counter()
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous())
    if timer is not None:
        timer.seconds += time.perf_counter() - t0
        timer.calls += 1
    return recv


def all_to_all_rows(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    timer: ExchangeTimer | None = None) -> torch.Tensor:
    """Sends ``rows[sum(send_counts[:p]) : ...]`` to peer p; returns what the peers sent, in rank order.

    ``rows`` may have trailing dimensions (vectors travel as ``[k, dim]``).
    """
    t0 = time.perf_counter()
    out = rows.new_empty((int(sum(recv_counts)), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=list(send_counts))
    if timer is not None:
        timer.seconds += time.perf_counter() - t0
        timer.calls += 1
        timer.rows_sent += int(rows.shape[0])
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a short vector (float64: exact for counts below 2**53)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agree_json(proposal: Any | None) -> list[Any | None]:
    """Every rank's JSON-able ``proposal`` (None = nothing to say), gathered on every rank."""
    data = b"" if proposal is None else json.dumps(proposal, sort_keys=True).encode()
    world = dist.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size)
    width = max(int(s.item()) for s in sizes) or 1
    buf = torch.zeros(width, dtype=torch.uint8)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(width, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, buf)
    out: list[Any | None] = []
    for s, b in zip(sizes, bufs):
        n = int(s.item())
        out.append(json.loads(bytes(b[:n].tolist()).decode()) if n else None)
    return out


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks of a short vector (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()
