"""Many read-only lookups of one table as one TorchScript call: probe, gather, pool.

A serving replica reads the table from a forward thread while an event-loop thread answers RPCs.
Every eager NumPy or torch call releases the GIL and must take it back, and while the loop holds
it that costs a wait each time: on two cores a batch's ~100 small calls spent three times their
CPU time waiting. Here the whole read (the same probe as :class:`~embedding_store.id_index.IdIndex`,
the same pooling as the reference kernel) is one compiled call that releases the GIL once.
Results are identical to :meth:`EmbeddingTable.lookup` / :meth:`EmbeddingTable.lookup_bags`.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, List, Optional

import torch

from embedding_store.id_index import find_rows_torch
from embedding_store.kernels.reference import embedding_bag_reference

__all__ = ["read_many", "read_rows", "find_rows", "scripted"]


def read_rows(tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
              lengths: List[Optional[torch.Tensor]], modes: List[str]) -> List[torch.Tensor]:
    """Every slot's read: ``modes[i]`` pools slot ``i``'s bags (sum or mean; one id per row
    where ``lengths[i]`` is None)."""
    out: List[torch.Tensor] = []
    for i in range(len(tabs)):
        bag_lengths = lengths[i]
        if bag_lengths is None:
            out.append(values[i].index_select(0, find_rows_torch(tabs[i], ids[i], 0)))  # row 0: the default
        else:
            out.append(_pooled(tabs[i], values[i], ids[i], bag_lengths, modes[i]))
    return out


def _pooled(tab: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor,
            mode: str) -> torch.Tensor:
    """One vector per bag. A serving batch reads a few small bags, where each op costs more than
    its data, so the common shapes take shortcuts: one id per bag (a user id) is that id's row
    whatever the mode, and a slot without ids pools to zeros without a probe."""
    shortest = int(lengths.min()) if lengths.numel() > 0 else 0
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    if shortest < 0 or int(lengths.sum()) != ids.numel():
        raise ValueError("bag lengths must be >= 0 and cover the ids exactly")
    if longest == 0:
        return torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype)
    rows = find_rows_torch(tab, ids, 0)
    if shortest == 1 and longest == 1:
        return values.index_select(0, rows)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return embedding_bag_reference(values, rows, offsets, mode, None, None)


_SCRIPTED: dict[Callable[..., Any], Any] = {}
_SCRIPT_LOCK = threading.Lock()


def scripted(fn: Callable[..., Any]) -> Any:
    """``fn`` compiled with TorchScript on first use (not at import: trainers never pay for it).
    TorchScript is deprecated, but it is the graph runner that needs no C++ toolchain at run time,
    and a compiled call releases the GIL once for all its ops."""
    compiled = _SCRIPTED.get(fn)
    if compiled is None:
        with _SCRIPT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            compiled = _SCRIPTED.get(fn)
            if compiled is None:
                compiled = _SCRIPTED[fn] = torch.jit.script(fn)
    return compiled


def read_many(tabs: List[torch.Tensor], values: List[torch.Tensor], ids: List[torch.Tensor],
              lengths: List[Optional[torch.Tensor]], modes: List[str]) -> List[torch.Tensor]:
    """Per query ``i``: rows of ``ids[i]`` in probe table ``tabs[i]`` gathered from ``values[i]``,
    one vector per id (``lengths[i]`` None) or pooled per bag (``modes[i]``: sum or mean)."""
    return scripted(read_rows)(tabs, values, ids, lengths, modes)


def find_rows(tab: torch.Tensor, keys: torch.Tensor, missing: int = -1) -> torch.Tensor:
    """``IdIndex.find(keys, missing)`` as one TorchScript call over ``IdIndex.table_view()``."""
    return scripted(find_rows_torch)(tab, keys, missing)
