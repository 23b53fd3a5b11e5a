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

from embedding_store.kernels.reference import embedding_bag_reference

__all__ = ["read_many", "read_rows", "find_rows", "find_rows_torch", "scripted"]


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


# ---- the id index's probe in torch ops (TorchScript-able) ----------------------------------------
# Serving's forward (:mod:`serving.compiled_forward`, via this module) is one TorchScript graph
# that probes, gathers and scores with the GIL released once; a graph cannot call numba, so the probe is written a second time here in torch ops: same home bucket, same table,
# same rows (the property tests in tests/embedding_store/test_id_index.py hold it to ``find``).
# TorchScript cannot read module globals, so _GOLDEN, the window (8) and EMPTY (-1) appear as
# literals. A serving batch reads a few small slots, so what counts here is the number of ops, not
# their width: the common case (every key found, or proved absent, in its home bucket) is a dozen.


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def find_rows_torch(tab: torch.Tensor, keys: torch.Tensor, missing: int) -> torch.Tensor:
    """``IdIndex.find(keys, missing)`` over ``tab``, an index's :meth:`IdIndex.table_view`."""
    cap = tab.shape[0]
    bits = 6  # capacities are powers of two, at least 64: buckets of 4 slots
    while (1 << bits) < cap:
        bits += 1
    mask = cap - 1
    golden = -7046029254386353131  # _GOLDEN's 64 bits as a (wrapping) signed int64
    bucket = _srl((_srl(keys, 32) ^ keys) * golden, 64 - bits + 2)
    line = tab.view(cap // 4, 8).index_select(0, bucket)  # key, row, key, row, ... per bucket
    hits = line[:, 0::2] == keys.unsqueeze(1)  # guard keys (see IdIndex): an equal key is a live row
    rows = line[:, 1::2]
    out = (rows * hits).sum(dim=1)  # at most one hit per bucket; 0 where none
    if missing != 0:
        out = torch.where(hits.any(dim=1), out, missing)
    # A bucket with neither the key nor an empty slot: the key may lie further on.
    pending = torch.nonzero(~(hits | (rows == -1)).any(dim=1)).squeeze(1)
    if pending.numel() == 0:
        return out
    pos = (bucket.index_select(0, pending) * 4 + 4) & mask
    k = keys.index_select(0, pending)
    steps = torch.arange(8, dtype=torch.int64)
    while pending.numel() > 0:
        p = pending.numel()
        win = (pos.unsqueeze(1) + steps) & mask
        e = tab.index_select(0, win.reshape(-1)).reshape(p, 8, 2)
        hitw = e[:, :, 0] == k.unsqueeze(1)
        # At most one hit per key, and never past an empty slot (linear probing's invariant).
        at = torch.nonzero(hitw)
        out.index_put_((pending.index_select(0, at[:, 0]),), e[at[:, 0], at[:, 1], 1])
        go_on = ~(hitw | (e[:, :, 1] == -1)).any(dim=1)
        pending, pos, k = pending[go_on], (pos[go_on] + 8) & mask, k[go_on]
    return out
