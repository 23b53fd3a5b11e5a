"""Collision-free 64-bit id -> row index: an open-addressing hash table probed by compiled loops.

Why not ``dict``: a batch of 65k ids would cost a Python-level call per id. Why not modulo
hashing into the embedding rows directly: two ids would share a row. Here the full 64-bit key is
stored beside its row number, so a lookup only ever returns the row of an *equal* key; the hash
only decides where probing starts.

Layout: one ``(capacity, 2)`` int64 array, column 0 the key, column 1 the row (``EMPTY`` = -1,
``TOMBSTONE`` = -2). Key and row share a cache line, so each probe costs one random access.
Every key value is legal (the "empty" marker lives in the row column, not the key column).
Linear probing from the key's home slot (:func:`_home`), capacity a power of two, load at most
``max_load`` (default 0.7).

A slot that holds no live key (empty, or a tombstone) holds a *guard key* instead of a stale
one: a key whose home is the next slot, which no probe that passes this slot can be looking for
(a probe only moves forward from its home and stops at an empty slot before it could wrap
around). So a key compare alone tells a live hit, with no second test of the row column.

Every probe rule lives here, compiled with numba (``nogil``: a batch releases the GIL once, so
two threads can share a lookup): :func:`_slot` walks one key, and each batch kernel is one loop
over its keys. The loops prefetch the slots of keys a few places ahead: a batch's keys are
independent, so their cache misses overlap instead of each stalling the next probe.
:meth:`IdIndex.gather` fuses the probe with the copy of each key's value row (``lookup``'s hot
path); :func:`take_rows` is that copy alone, for rows already resolved. One more copy of the probe
exists, :func:`~embedding_store.batched_read.find_rows_torch`, in torch ops, because serving's
TorchScript forward (:mod:`serving.compiled_forward`) embeds it in its graph, which cannot call
numba; the tests hold the two to the same rows.

Compiled code is cached on disk (numba's ``cache=True``: ``__pycache__`` beside this file, or the
user's cache directory where the checkout is read-only; with neither writable, each process
compiles), so only the first run after a change compiles (a few seconds for all kernels);
:func:`warm_up` does it ahead of timed work. All kernels live in this one file on purpose: numba
checks a cached kernel against its own file only, so a helper in another file could go stale.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from hashing import GOLDEN, splitmix64

log = logging.getLogger(__name__)

EMPTY = -1
TOMBSTONE = -2

_GOLDEN = GOLDEN
_GOLDEN_INV = np.uint64(pow(int(GOLDEN), -1, 1 << 64))  # GOLDEN * _GOLDEN_INV == 1 (mod 2**64)
# Keys looked ahead by the batch loops: enough cache misses in flight to cover memory latency
# (bench embedding's table, 2M slots, 64-float rows: 8 to 24 alike, 4 about 12% slower).
_AHEAD = 8
_RING = 32  # rows held between their probe and their copy in gather (a power of two above _AHEAD)
_CACHE_LINE = 64

mix64 = splitmix64  # the name bench/embedding.py imports; new code imports hashing.splitmix64


_UNCACHED: list[str] = []  # kernels compiled without a disk cache


def _kernel(fn):
    """``fn`` compiled without the GIL, its machine code cached on disk; where no cache directory
    is writable (a read-only checkout and no writable home), compiled afresh in each process."""
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
        if "cannot cache" not in str(exc):
            raise
        if not _UNCACHED:
            log.warning("numba cannot cache the id index's kernels (%s): they compile in every process", exc)
        _UNCACHED.append(fn.__name__)
        return njit(nogil=True)(fn)


@intrinsic
def _prefetch(typingctx, arr, i, j):  # noqa: ARG001 - numba passes the typing context
    """Asks the CPU to start loading ``arr[i, j]``'s cache line (``llvm.prefetch``: a read,
    kept in every cache level); a hint only, it never faults."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # (address, 0 = read, 3 = keep in all cache levels, 1 = data cache)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


# ---- the probe rules ---------------------------------------------------------------------------
@njit(inline="always")
def _geometry(tab):
    """(mask, shift) of a table: positions wrap with ``& mask``; ``_home`` keeps the top
    ``64 - shift`` bits. Capacities are powers of two, at least 16."""
    cap = tab.shape[0]
    bits = 4
    while (1 << bits) < cap:
        bits += 1
    return cap - 1, np.uint64(64 - bits)


@njit(inline="always")
def _home(key, shift):
    """Home slot: fold the high half into the low half, then Fibonacci (multiply-shift)
    hashing, whose top bits depend on every input bit. Cheaper than SplitMix64, and the hash
    only affects probe length, never correctness."""
    u = np.uint64(key)
    return np.int64(((u >> np.uint64(32)) ^ u) * _GOLDEN >> shift)


@njit(inline="always")
def _guard_key(slot, mask, shift):
    """A key whose home (:func:`_home`) is the slot after ``slot``: ``_home`` run backwards
    (multiply by GOLDEN's inverse, then undo the fold of the high half)."""
    x = (np.uint64((slot + 1) & mask) << shift) * _GOLDEN_INV  # x * GOLDEN == home << shift
    return np.int64(x ^ (x >> np.uint64(32)))  # key = (hi, lo ^ hi), whose fold is x again


@njit(inline="always")
def _slot(tab, mask, shift, key):
    """Position of ``key``, -1 if absent. Guard keys make an equal key a live hit; an empty
    slot ends the search (linear probing's invariant: a key never lies past one)."""
    pos = _home(key, shift)
    while True:
        if tab[pos, 0] == key:
            return pos
        if tab[pos, 1] == EMPTY:
            return -1
        pos = (pos + 1) & mask


# ---- batch kernels -------------------------------------------------------------------------------
@_kernel
def _fill_empty(tab):
    mask, shift = _geometry(tab)
    for p in range(tab.shape[0]):
        tab[p, 0] = _guard_key(p, mask, shift)
        tab[p, 1] = EMPTY


@_kernel
def _find_rows(tab, keys, missing, out):
    mask, shift = _geometry(tab)
    n = keys.shape[0]
    for i in range(min(_AHEAD, n)):
        _prefetch(tab, _home(keys[i], shift), 0)
    for i in range(n):
        if i + _AHEAD < n:
            _prefetch(tab, _home(keys[i + _AHEAD], shift), 0)
        p = _slot(tab, mask, shift, keys[i])
        out[i] = tab[p, 1] if p >= 0 else missing


@njit(inline="always")
def _prefetch_row(values, r, per_line):
    for c in range(0, values.shape[1], per_line):
        _prefetch(values, r, c)


@njit(inline="always")
def _copy_row(values, r, out, k):
    for c in range(values.shape[1]):
        out[k, c] = values[r, c]


@_kernel
def _gather_rows(tab, keys, values, missing, out):
    """``out[i] = values[row of keys[i]]`` (``values[missing]`` if absent), pipelined: while
    key i's row is copied, key i + _AHEAD's row and key i + 2 * _AHEAD's slot are being fetched."""
    mask, shift = _geometry(tab)
    n = keys.shape[0]
    per_line = max(1, _CACHE_LINE // values.itemsize)
    ring = np.empty(_RING, dtype=np.int64)
    for i in range(n + 2 * _AHEAD):
        if i < n:
            _prefetch(tab, _home(keys[i], shift), 0)
        j = i - _AHEAD
        if 0 <= j < n:
            p = _slot(tab, mask, shift, keys[j])
            r = tab[p, 1] if p >= 0 else missing
            ring[j & (_RING - 1)] = r
            _prefetch_row(values, r, per_line)
        k = i - 2 * _AHEAD
        if k >= 0:
            _copy_row(values, ring[k & (_RING - 1)], out, k)


@_kernel
def _take_rows(values, rows, out):
    """``out[i] = values[rows[i]]``: the copy half of :func:`_gather_rows`, same prefetching."""
    n = rows.shape[0]
    per_line = max(1, _CACHE_LINE // values.itemsize)
    for i in range(n + _AHEAD):
        if i < n:
            _prefetch_row(values, rows[i], per_line)
        k = i - _AHEAD
        if k >= 0:
            _copy_row(values, rows[k], out, k)


@_kernel
def _place(tab, keys, rows):
    """Puts each (absent) key in the first reusable slot from its home; returns how many of
    those slots were empty (not tombstones)."""
    mask, shift = _geometry(tab)
    took_empty = 0
    for i in range(keys.shape[0]):
        pos = _home(keys[i], shift)
        while tab[pos, 1] >= 0:  # a live key: go on (empty and tombstone slots are reusable)
            pos = (pos + 1) & mask
        took_empty += tab[pos, 1] == EMPTY
        tab[pos, 0] = keys[i]
        tab[pos, 1] = rows[i]
    return took_empty


@_kernel
def _remove(tab, keys, out):
    """Tombstones each key's slot, writing the row it held (-1 if absent) to ``out``; returns
    how many keys were removed. A key repeated in ``keys`` is removed once: later copies read
    as absent."""
    mask, shift = _geometry(tab)
    removed = 0
    for i in range(keys.shape[0]):
        p = _slot(tab, mask, shift, keys[i])
        if p < 0:
            out[i] = -1
            continue
        out[i] = tab[p, 1]
        tab[p, 1] = TOMBSTONE
        tab[p, 0] = _guard_key(p, mask, shift)  # the key is gone from every probe
        removed += 1
    return removed


def _keys(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys, dtype=np.int64).reshape(-1)


class IdIndex:
    """Maps distinct int64 keys to int64 rows; batched ``find``/``gather``/``insert``/``remove``."""

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
        tab = np.empty((capacity, 2), dtype=np.int64)
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
        self._tab = self._empty_table(1 << max(4, int(np.ceil(need / self.max_load) - 1).bit_length()))
        self._size = keys.shape[0]
        self._used = int(_place(self._tab, keys, rows))


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
