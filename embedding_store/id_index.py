"""Collision-free 64-bit id -> row index: an open-addressing hash table probed in NumPy batches.

Why not ``dict``: a batch of 65k ids would cost a Python-level call per id. Why not modulo
hashing into the embedding rows directly: two ids would share a row. Here the full 64-bit key is
stored beside its row number, so a lookup only ever returns the row of an *equal* key; the hash
only decides where probing starts.

Layout: one ``(capacity, 2)`` int64 array, column 0 the key, column 1 the row (``EMPTY`` = -1,
``TOMBSTONE`` = -2). Key and row share a cache line, so each probe costs one random access.
Every key value is legal (the "empty" marker lives in the row column, not the key column).
Linear probing, all pending keys advance one step per vectorised round; the number of rounds is
the longest probe sequence of the batch; past the home slot, keys probe windows of 8 slots per
round, so even at the default maximum load factor of 0.7 a batch takes only a few rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from hashing import GOLDEN, splitmix64

EMPTY = -1
TOMBSTONE = -2

_GOLDEN = GOLDEN
WINDOW = 8
_WINDOW_STEPS = np.arange(WINDOW, dtype=np.int64)

mix64 = splitmix64  # the name bench/embedding.py imports; new code imports hashing.splitmix64


class IdIndex:
    """Maps distinct int64 keys to int64 rows; batched ``find``/``insert``/``remove``."""

    def __init__(self, capacity: int = 1024, max_load: float = 0.7) -> None:
        if not 0.1 <= max_load <= 0.9:
            raise ValueError(f"max_load must be in [0.1, 0.9], got {max_load}")
        cap = 1 << max(4, int(capacity - 1).bit_length())
        self.max_load = max_load
        self._tab = np.empty((cap, 2), dtype=np.int64)
        self._tab[:, 1] = EMPTY
        self._size = 0  # live keys
        self._used = 0  # live keys + tombstones

    # ---- introspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._tab.shape[0]

    @property
    def _bits(self) -> int:
        return self._tab.shape[0].bit_length() - 1

    @property
    def nbytes(self) -> int:
        return int(self._tab.nbytes)

    def table_view(self) -> torch.Tensor:
        """The probe table as a tensor sharing its memory, for :func:`find_rows_torch`. Valid
        until the next insert (which may rebuild); hold the owner's lock while using it."""
        return torch.from_numpy(self._tab)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys, rows), in table order."""
        live = self._tab[:, 1] >= 0
        return self._tab[live, 0].copy(), self._tab[live, 1].copy()

    # ---- probing -------------------------------------------------------------------------
    def _start(self, keys: np.ndarray) -> np.ndarray:
        """Home slot: fold the high half into the low half, then Fibonacci (multiply-shift)
        hashing, whose top bits depend on every input bit. Two passes cheaper than SplitMix64,
        and the hash only affects probe length, never correctness."""
        u = keys.view(np.uint64)
        h = u >> np.uint64(32)  # in-place from here: no temporaries on the hot path
        h ^= u
        h *= _GOLDEN
        h >>= np.uint64(64 - self._bits)
        return h.view(np.int64)

    def _slots(self, pos: np.ndarray) -> np.ndarray:
        """Gather (key, row) pairs as one 16-byte element each: ~4x faster than 2-D indexing."""
        return self._tab.view(np.complex128).reshape(-1).take(pos).view(np.int64).reshape(-1, 2)

    def _probe(self, keys: np.ndarray, missing: int = -1, want_pos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(table position, row) of each key; (-1, ``missing``) where absent. Positions are
        only computed when ``want_pos``."""
        n = keys.shape[0]
        if n == 0 or self._size == 0:
            return np.full(n, -1, dtype=np.int64), np.full(n, missing, dtype=np.int64)
        mask = self.capacity - 1
        pos = self._start(keys)
        # Round one handles every key at once; most hit (or miss) at their home slot.
        entry = self._slots(pos)
        row = entry[:, 1]
        hit = (entry[:, 0] == keys) & (row >= 0)
        out_pos = np.where(hit, pos, -1) if want_pos else np.empty(0, dtype=np.int64)
        # row * hit: rows where found, 0 elsewhere; cheaper than np.where on the hot path.
        out_row = row * hit if missing == 0 else np.where(hit, row, missing)
        pending = np.flatnonzero(~hit & (row != EMPTY))
        # The few keys left probe a window of WINDOW slots per round: one gather per window
        # instead of a round of small NumPy calls per slot.
        pos, k = (pos[pending] + 1) & mask, keys[pending]
        while pending.size:
            p = pending.size
            win = (pos[:, None] + _WINDOW_STEPS) & mask
            entry = self._slots(win.reshape(-1)).reshape(p, WINDOW, 2)
            rk, rr = entry[:, :, 0], entry[:, :, 1]
            hit = (rk == k[:, None]) & (rr >= 0)
            stop = hit | (rr == EMPTY)
            first = stop.argmax(axis=1)
            at = np.arange(p)
            found = hit[at, first]  # first stop is the key itself (else: an empty slot, absent)
            if found.any():
                if want_pos:
                    out_pos[pending[found]] = win[at, first][found]
                out_row[pending[found]] = rr[at, first][found]
            go_on = ~stop[at, first]
            pending, pos, k = pending[go_on], (pos[go_on] + WINDOW) & mask, k[go_on]
        return out_pos, out_row

    def find(self, keys: np.ndarray, missing: int = -1) -> np.ndarray:
        """Row of each key, ``missing`` where absent. ``keys`` int64[n], duplicates allowed."""
        return self._probe(np.ascontiguousarray(keys, dtype=np.int64), missing)[1]

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add distinct keys that are not yet present (the caller found them absent)."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        n = keys.shape[0]
        if n == 0:
            return
        if (self._used + n) > self.max_load * self.capacity:
            self._rebuild(max(self._size + n, 16))
        self._place(keys, rows)

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        mask = self.capacity - 1
        pos = self._start(keys)
        pending = np.arange(keys.shape[0])
        while pending.size:
            free = self._tab[pos, 1] < 0  # empty or tombstone: both reusable for absent keys
            cand = np.flatnonzero(free)
            placed = np.zeros(pending.size, dtype=bool)
            if cand.size:
                # Several keys may aim at the same free slot this round: the first one wins.
                _, first = np.unique(pos[cand], return_index=True)
                win = cand[first]
                p = pos[win]
                was_empty = self._tab[p, 1] == EMPTY
                self._tab[p, 0] = keys[pending[win]]
                self._tab[p, 1] = rows[pending[win]]
                self._used += int(was_empty.sum())
                self._size += win.size
                placed[win] = True
            # Losers stay put (their slot is now taken and they advance next round).
            keep = ~placed
            pending, pos, free = pending[keep], pos[keep], free[keep]
            pos = np.where(free, pos, (pos + 1) & mask)

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; returns the rows they held (-1 for keys that were absent)."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        pos, rows = self._probe(keys, want_pos=True)
        p = np.unique(pos[pos >= 0])
        self._tab[p, 1] = TOMBSTONE
        self._size -= p.size
        # Tombstones lengthen probes; rebuild once they outnumber live keys.
        if self._used - self._size > max(self._size, self.capacity // 8):
            self._rebuild(max(self._size, 16))
        return rows

    def _rebuild(self, need: int) -> None:
        keys, rows = self.items()
        cap = 1 << max(4, int(np.ceil(need / self.max_load) - 1).bit_length())
        self._tab = np.empty((cap, 2), dtype=np.int64)
        self._tab[:, 1] = EMPTY
        self._size = 0
        self._used = 0
        if keys.size:
            self._place(keys, rows)


# ---- the same probe in torch ops (TorchScript-able) ----------------------------------------------
# ``IdIndex._probe`` issues a dozen NumPy calls per round, each releasing and re-taking the GIL.
# Compiled with TorchScript (see :mod:`embedding_store.batched_read`), this identical probe (same
# home slot, same windows) runs with the GIL released once for the whole lookup. TorchScript cannot
# read module globals, so _GOLDEN, WINDOW (8) and EMPTY (-1) appear as literals; the property tests
# in tests/embedding_store/test_id_index.py check this probe against the NumPy one.


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def find_rows_torch(tab: torch.Tensor, keys: torch.Tensor, missing: int) -> torch.Tensor:
    """``IdIndex.find(keys, missing)`` over ``tab``, an index's :meth:`IdIndex.table_view`."""
    cap = tab.shape[0]
    bits = 0
    while (1 << bits) < cap:
        bits += 1
    mask = cap - 1
    golden = -7046029254386353131  # _GOLDEN's 64 bits as a (wrapping) signed int64
    pos = _srl((_srl(keys, 32) ^ keys) * golden, 64 - bits)
    entry = tab.index_select(0, pos)
    row = entry[:, 1]
    hit = (entry[:, 0] == keys) & (row >= 0)
    out = torch.where(hit, row, torch.full_like(row, missing))
    pending = torch.nonzero(~hit & (row != -1)).squeeze(1)
    pos = (pos.index_select(0, pending) + 1) & mask
    k = keys.index_select(0, pending)
    steps = torch.arange(8, dtype=torch.int64)
    while pending.numel() > 0:
        p = pending.numel()
        win = (pos.unsqueeze(1) + steps) & mask
        e = tab.index_select(0, win.reshape(-1)).reshape(p, 8, 2)
        rk, rr = e[:, :, 0], e[:, :, 1]
        hitw = (rk == k.unsqueeze(1)) & (rr >= 0)
        stop = hitw | (rr == -1)
        first = stop.to(torch.uint8).argmax(dim=1, keepdim=True)
        found = hitw.gather(1, first).squeeze(1)
        out.index_put_((pending[found],), rr.gather(1, first).squeeze(1)[found])
        go_on = ~stop.gather(1, first).squeeze(1)
        pending, pos, k = pending[go_on], (pos[go_on] + 8) & mask, k[go_on]
    return out
