"""Collision-free 64-bit id -> row index: an open-addressing hash table probed in NumPy batches.

Why not ``dict``: a batch of 65k ids would cost a Python-level call per id. Why not modulo
hashing into the embedding rows directly: two ids would share a row. Here the full 64-bit key is
stored beside its row number, so a lookup only ever returns the row of an *equal* key; the hash
only decides where probing starts.

Layout: one ``(capacity, 2)`` int64 array, column 0 the key, column 1 the row (``EMPTY`` = -1,
``TOMBSTONE`` = -2). Key and row share a cache line, so each probe costs one random access.
Every key value is legal (the "empty" marker lives in the row column, not the key column).
Linear probing, all pending keys advance one step per vectorised round while many are left (most
settle within a slot or two of home), then the few left probe windows of 8 slots per round, so
even at the default maximum load factor of 0.7 a batch takes only a few rounds.

A slot that holds no live key (empty, or a tombstone) holds a *guard key* instead of a stale
one: a key whose home is the next slot, which no probe that passes this slot can be looking for
(a probe only moves forward from its home and stops at an empty slot before it could wrap
around). So a key compare alone tells a live hit, with no second test of the row column, and
a key appears at most once on any probe path: a lookup's first round is a gather and four array
passes, and a window's hits need no "first match" search.
"""

from __future__ import annotations

import numpy as np
import torch

from hashing import GOLDEN, splitmix64

EMPTY = -1
TOMBSTONE = -2

_GOLDEN = GOLDEN
_GOLDEN_INV = np.uint64(pow(int(GOLDEN), -1, 1 << 64))  # GOLDEN * _GOLDEN_INV == 1 (mod 2**64)
WINDOW = 8  # slots per window: 8 bools view as one uint64 (see _probe_on)
_WINDOW_STEPS = np.arange(1, WINDOW + 1, dtype=np.int64)  # a window starts after the last slot probed
_SINGLE_STEP_MIN = 1024  # keys left above which a round probes one slot each, not a window

mix64 = splitmix64  # the name bench/embedding.py imports; new code imports hashing.splitmix64


class IdIndex:
    """Maps distinct int64 keys to int64 rows; batched ``find``/``insert``/``remove``."""

    def __init__(self, capacity: int = 1024, max_load: float = 0.7) -> None:
        if not 0.1 <= max_load <= 0.9:
            raise ValueError(f"max_load must be in [0.1, 0.9], got {max_load}")
        self.max_load = max_load
        self._tab = self._empty_table(1 << max(4, int(capacity - 1).bit_length()))
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

    @staticmethod
    def _guard_keys(slots: np.ndarray, capacity: int) -> np.ndarray:
        """Per slot, a key whose home (:meth:`_start`) is the next slot: :meth:`_start` run
        backwards (multiply by GOLDEN's inverse, then undo the fold of the high half)."""
        bits = capacity.bit_length() - 1
        home = (np.asarray(slots, dtype=np.int64) + 1) & (capacity - 1)
        x = home.astype(np.uint64) << np.uint64(64 - bits)
        x *= _GOLDEN_INV  # x * GOLDEN == home << (64 - bits): the top bits are the home
        hi = x >> np.uint64(32)
        x ^= hi  # key = (hi, lo ^ hi), whose fold (key >> 32) ^ key is x again
        return x.view(np.int64)

    def _empty_table(self, capacity: int) -> np.ndarray:
        tab = np.empty((capacity, 2), dtype=np.int64)
        tab[:, 0] = self._guard_keys(np.arange(capacity), capacity)
        tab[:, 1] = EMPTY
        return tab

    def _slots(self, pos: np.ndarray) -> np.ndarray:
        """Gather (key, row) pairs as one 16-byte element each: ~4x faster than 2-D indexing."""
        return self._tab.view(np.complex128).reshape(-1).take(pos).view(np.int64).reshape(-1, 2)

    def _probe(self, keys: np.ndarray, missing: int = -1, want_pos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(table position, row) of each key; (-1, ``missing``) where absent. Positions are
        only computed when ``want_pos``."""
        n = keys.shape[0]
        if n == 0 or self._size == 0:
            return np.full(n, -1, dtype=np.int64), np.full(n, missing, dtype=np.int64)
        pos = self._start(keys)
        # Round one handles every key at once; most hit (or miss) at their home slot. Guard keys
        # make an equal key a live hit, without a look at the row column.
        entry = self._slots(pos)
        row = entry[:, 1]
        hit = entry[:, 0] == keys
        out_pos = np.where(hit, pos, -1) if want_pos else np.empty(0, dtype=np.int64)
        # row * hit: rows where found, 0 elsewhere; cheaper than np.where on the hot path.
        out_row = row * hit if missing == 0 else np.where(hit, row, missing)
        pending = np.flatnonzero(np.greater(row != EMPTY, hit))  # occupied by another key: go on
        if pending.size:
            self._probe_on(keys[pending], pos[pending], pending, out_row, out_pos if want_pos else None)
        return out_pos, out_row

    def _probe_on(self, keys: np.ndarray, pos: np.ndarray, at: np.ndarray, out_row: np.ndarray,
                  out_pos: np.ndarray | None) -> None:
        """Probes past ``pos`` for the keys whose earlier slots held other keys, writing each hit
        into ``out_row[at]`` (and ``out_pos[at]``). While many keys are left, one slot per round
        (most stop at their next slot); then windows of ``WINDOW`` slots, one gather each, so
        the long tail of a batch takes few rounds."""
        mask = self.capacity - 1
        while at.size >= _SINGLE_STEP_MIN:
            pos = (pos + 1) & mask
            entry = self._slots(pos)
            row = entry[:, 1]
            hit = entry[:, 0] == keys
            found = np.flatnonzero(hit)
            out_row[at[found]] = row[found]
            if out_pos is not None:
                out_pos[at[found]] = pos[found]
            go_on = np.greater(row != EMPTY, hit)
            at, pos, keys = at[go_on], pos[go_on], keys[go_on]
        while at.size:
            win = (pos[:, None] + _WINDOW_STEPS) & mask
            entry = self._slots(win.reshape(-1)).reshape(at.size, WINDOW, 2)
            hit = entry[:, :, 0] == keys[:, None]
            # At most one hit per key, and never past an empty slot (linear probing's invariant).
            key_i, slot_i = np.nonzero(hit)
            out_row[at[key_i]] = entry[key_i, slot_i, 1]
            if out_pos is not None:
                out_pos[at[key_i]] = win[key_i, slot_i]
            # A key's WINDOW (= 8) flags are 8 contiguous bytes: "any" is one compare of a uint64
            # (NumPy's reductions along a short axis are ~20x slower).
            stop = hit | (entry[:, :, 1] == EMPTY)
            go_on = stop.view(np.uint64).reshape(-1) == 0
            at, pos, keys = at[go_on], (pos[go_on] + WINDOW) & mask, keys[go_on]

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
        self._tab[p, 0] = self._guard_keys(p, self.capacity)  # the key is gone from every probe
        self._size -= p.size
        # Tombstones lengthen probes; rebuild once they outnumber live keys.
        if self._used - self._size > max(self._size, self.capacity // 8):
            self._rebuild(max(self._size, 16))
        return rows

    def _rebuild(self, need: int) -> None:
        keys, rows = self.items()
        self._tab = self._empty_table(1 << max(4, int(np.ceil(need / self.max_load) - 1).bit_length()))
        self._size = 0
        self._used = 0
        if keys.size:
            self._place(keys, rows)


# ---- the same probe in torch ops (TorchScript-able) ----------------------------------------------
# ``IdIndex._probe`` issues a dozen NumPy calls per round, each releasing and re-taking the GIL.
# Compiled with TorchScript (see :mod:`embedding_store.batched_read`), this identical probe (same
# home slot, same table) runs with the GIL released once for the whole lookup. TorchScript cannot
# read module globals, so _GOLDEN, WINDOW (8) and EMPTY (-1) appear as literals; the property tests
# in tests/embedding_store/test_id_index.py check this probe against the NumPy one. A serving batch
# reads a few small slots, so what counts here is the number of ops, not their width: the common
# case (every key settled at its home slot) is a dozen.


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def find_rows_torch(tab: torch.Tensor, keys: torch.Tensor, missing: int) -> torch.Tensor:
    """``IdIndex.find(keys, missing)`` over ``tab``, an index's :meth:`IdIndex.table_view`."""
    cap = tab.shape[0]
    bits = 4  # capacities are powers of two, at least 16
    while (1 << bits) < cap:
        bits += 1
    mask = cap - 1
    golden = -7046029254386353131  # _GOLDEN's 64 bits as a (wrapping) signed int64
    pos = _srl((_srl(keys, 32) ^ keys) * golden, 64 - bits)
    entry = tab.index_select(0, pos)
    row = entry[:, 1]
    hit = entry[:, 0] == keys  # guard keys (see IdIndex): an equal key is a live row
    out = row * hit if missing == 0 else torch.where(hit, row, missing)
    pending = torch.nonzero(torch.gt(row != -1, hit)).squeeze(1)  # another key there: go on
    if pending.numel() == 0:
        return out
    pos = (pos.index_select(0, pending) + 1) & mask
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
