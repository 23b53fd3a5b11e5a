"""Collision-free 64-bit id -> row index: an open-addressing hash table probed by compiled loops.

Why not ``dict``: a batch of 65k ids would cost a Python-level call per id. Why not modulo
hashing into the embedding rows directly: two ids would share a row. Here the full 64-bit key is
stored beside its row number, so a lookup only ever returns the row of an *equal* key; the hash
only decides where probing starts.

The table's layout, its probe rules and their compiled batch kernels are in
:mod:`embedding_store.id_index_kernels`; this module is the Python side: sizing, rebuilds,
argument checks, and the one copy loop exported for callers (:func:`take_rows`).
"""

from __future__ import annotations

import numpy as np
import torch

from embedding_store.id_index_kernels import (_CACHE_LINE, _MIN_CAPACITY, EMPTY, TOMBSTONE, _fill_empty,
                                              _find_rows, _gather_rows, _place, _remove, _take_rows, mix64)

__all__ = ["EMPTY", "TOMBSTONE", "IdIndex", "mix64", "take_rows", "warm_up"]


def _keys(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)


class IdIndex:
    """Maps distinct int64 keys to int64 rows; batched ``find``/``gather``/``insert``/``remove``.
    Rows are ``>= 0``."""

    def __init__(self, capacity: int = 1024, max_load: float = 0.7) -> None:
        if not 0.1 <= max_load <= 0.9:
            raise ValueError(f"max_load must be in [0.1, 0.9], got {max_load}")
        self.max_load = max_load
        self._tab = self._empty_table(_capacity(capacity))
        self._size = 0  # live keys
        self._used = 0  # live keys + tombstones

    # ---- introspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._tab.shape[0]

    @property
    def nbytes(self) -> int:
        return int(self._tab.nbytes)

    def table_view(self) -> torch.Tensor:
        """The probe table as a tensor sharing its memory, for :func:`~embedding_store.batched_read.find_rows_torch`. Valid
        until the next insert (which may rebuild); hold the owner's lock while using it."""
        return torch.from_numpy(self._tab)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """All live (keys, rows), in table order."""
        live = self._tab[:, 1] >= 0
        return self._tab[live, 0].copy(), self._tab[live, 1].copy()

    @staticmethod
    def _empty_table(capacity: int) -> np.ndarray:
        # Aligned to a cache line, so that each bucket is one line (the view keeps ``raw`` alive).
        raw = np.empty(2 * capacity + _CACHE_LINE // 8, dtype=np.int64)
        skip = (-raw.ctypes.data % _CACHE_LINE) // 8
        tab = raw[skip:skip + 2 * capacity].reshape(capacity, 2)
        _fill_empty(tab)
        return tab

    # ---- batches -------------------------------------------------------------------------
    def find(self, keys: np.ndarray, missing: int = -1) -> np.ndarray:
        """Row of each key, ``missing`` where absent. ``keys`` int64[n], duplicates allowed."""
        keys = _keys(keys)
        out = np.empty(keys.shape[0], dtype=np.int64)
        _find_rows(self._tab, keys, missing, out)
        return out

    def gather(self, keys: np.ndarray, values: np.ndarray, out: np.ndarray, missing: int = 0) -> None:
        """``out[i] = values[row of keys[i]]``, ``values[missing]`` where absent: the probe and
        the copy in one compiled pass, with the GIL released. ``values`` must hold every row the
        index names (the caller's contract, as for ``find``); ``out`` is ``[n, values.shape[1]]``."""
        keys = _keys(keys)
        _check_gather(values, out, keys.shape[0])
        if not 0 <= missing < values.shape[0]:
            raise ValueError(f"missing row {missing} outside values' {values.shape[0]} rows")
        _gather_rows(self._tab, keys, values, missing, out)

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add distinct keys that are not yet present (the caller found them absent)."""
        keys = _keys(keys)
        rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        n = keys.shape[0]
        if n != rows.shape[0]:
            raise ValueError(f"{n} keys but {rows.shape[0]} rows")
        if n == 0:
            return
        if (rows < 0).any():
            raise ValueError("rows must be >= 0 (negative rows mark free slots)")
        if (self._used + n) > self.max_load * self.capacity:
            self._rebuild(max(self._size + n, 16))
        self._used += int(_place(self._tab, keys, rows))
        self._size += n

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Remove keys; returns the rows they held (-1 for keys that were absent). A key listed
        twice is removed once: its later copies read -1, so no row is handed back twice."""
        keys = _keys(keys)
        rows = np.empty(keys.shape[0], dtype=np.int64)
        self._size -= int(_remove(self._tab, keys, rows))
        # Tombstones lengthen probes; rebuild once they outnumber live keys.
        if self._used - self._size > max(self._size, self.capacity // 8):
            self._rebuild(max(self._size, 16))
        return rows

    def _rebuild(self, need: int) -> None:
        keys, rows = self.items()
        self._tab = self._empty_table(_capacity(int(np.ceil(need / self.max_load))))
        self._size = keys.shape[0]
        self._used = int(_place(self._tab, keys, rows))


def _capacity(slots: int) -> int:
    """The power of two at or above ``slots``, at least ``_MIN_CAPACITY``."""
    return max(_MIN_CAPACITY, 1 << int(slots - 1).bit_length())


def take_rows(values: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``values.take(rows, axis=0, out=out)`` as the compiled, prefetching copy loop of
    :meth:`IdIndex.gather` (for rows already resolved), with the GIL released. ``rows`` must lie
    in ``values`` (not checked per row: they come from the index)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    if out is None:
        out = np.empty((rows.shape[0], values.shape[1]), dtype=values.dtype)
    _check_gather(values, out, rows.shape[0])
    _take_rows(values, rows, out)
    return out


def _check_gather(values: np.ndarray, out: np.ndarray, n: int) -> None:
    if values.ndim != 2 or not values.flags.c_contiguous or not out.flags.c_contiguous:
        raise ValueError("a gather needs C-contiguous 2-D values and out")
    if out.shape != (n, values.shape[1]) or out.dtype != values.dtype:
        raise ValueError(f"out must be {values.dtype}[{n}, {values.shape[1]}], got {out.dtype}{list(out.shape)}")


def warm_up() -> None:
    """Compiles (or loads from numba's cache) the kernels for the array types the table uses,
    so that the first timed batch does not pay for it."""
    index = IdIndex(16)
    keys = np.arange(3, dtype=np.int64)
    index.insert(keys, keys)
    index.find(keys, missing=0)
    values = np.zeros((3, 4), dtype=np.float32)
    index.gather(keys, values, np.empty((3, 4), dtype=np.float32))
    take_rows(values, keys)
    index.remove(keys[:1])
