"""The id index's compiled probe rules (numba): layout, probing, the batch kernels.

Layout: one ``(capacity, 2)`` int64 array, column 0 the key, column 1 the row (``EMPTY`` = -1,
``TOMBSTONE`` = -2), aligned so that every cache line holds four whole slots: a *bucket*. Every
key value is legal (the "empty" marker lives in the row column, not the key column). A key's
home is the first slot of a bucket (:func:`_bucket`, Fibonacci hashing), and linear probing goes
on from there, so a probe reads one cache line: its four keys are compared at once
(:func:`_match_line`), and the search ends in that line when it holds the key or an empty slot
(linear probing never places a key past an empty slot). Only a key displaced past a full bucket,
or a miss whose bucket is full, walks on to the next line. Capacity a power of two, at least
64; load at most ``max_load`` (default 0.7).

A slot that holds no live key (empty, or a tombstone) holds a *guard key* instead of a stale
one: a key whose home is the next bucket, which no probe that reaches this slot can be looking
for (a probe only moves forward from its home and stops at an empty slot before it could wrap
around: with at least 64 slots and load at most 0.9 there is always an empty slot outside any
one bucket). So a key compare alone tells a live hit, with no second test of the row column.

Every probe rule lives here, compiled with numba (``nogil``: a batch releases the GIL once, so
two threads can share a lookup). The batch kernels are software pipelines over their keys: a
batch's keys are independent, so the line of key i + _AHEAD is prefetched while key i is probed
and their cache misses overlap. :meth:`IdIndex.gather` (``lookup``'s hot path) fuses the probe
with the copy of each key's value row in three stages, a few keys apart: probe the home line;
finish the rare walk past it (the next line was prefetched when the probe left its own) and
prefetch the row; copy the row. :func:`take_rows` is the copy stage alone, for rows already
resolved. One more copy of the probe exists, :func:`~embedding_store.batched_read.find_rows_torch`,
in torch ops, because serving's TorchScript forward (:mod:`serving.compiled_forward`) embeds it
in its graph, which cannot call numba; the tests hold the two to the same rows.

Compiled code is cached on disk (numba's ``cache=True``: ``__pycache__`` beside this file, or the
user's cache directory where the checkout is read-only; with neither writable, each process
compiles), so only the first run after a change compiles (a few seconds for all kernels);
:func:`warm_up` does it ahead of timed work. All kernels live in this one file on purpose: numba
checks a cached kernel against its own file only, so a helper in another file could go stale
(:mod:`embedding_store.id_index` only calls them).

"""

from __future__ import annotations

import logging

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from hashing import GOLDEN, splitmix64

log = logging.getLogger(__name__)

EMPTY = -1
TOMBSTONE = -2

_GOLDEN = GOLDEN
_GOLDEN_INV = np.uint64(pow(int(GOLDEN), -1, 1 << 64))  # GOLDEN * _GOLDEN_INV == 1 (mod 2**64)
# Keys looked ahead by the batch loops: enough cache misses in flight to cover memory latency,
# which grows when other jobs share the memory (bench embedding's table, 2M slots, 64-float rows,
# at load 4-7 on 2 cores: a copy and a gather 15-25% faster at 16 than at 8, no better at 24).
_AHEAD = 16  # home buckets fetched ahead of their probe; rows ahead of their copy
_WALK_AHEAD = 8  # gather: keys between a probe that leaves its home line and the end of its walk
_FIND_AHEAD = 32  # find: nothing but probes to overlap (2x the rate of 8)
_RING = 32  # rows held between their probe and their copy (a power of two above 1 + 8 + 16)
_CACHE_LINE = 64
_BUCKET = 4  # slots per cache line: 16-byte (key, row) pairs
_MIN_CAPACITY = 64

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
def _prefetch(typingctx, arr, i, offset):  # noqa: ARG001 - numba passes the typing context
    """Asks the CPU to start loading the cache line ``offset`` bytes past ``arr[i, 0]``
    (``llvm.prefetch``: a read, kept in every cache level); a hint only, it never faults."""
    sig = types.void(arr, i, offset)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], zero], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        at = builder.gep(builder.bitcast(ptr, i8p), [args[2]])
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # (address, 0 = read, 3 = keep in all cache levels, 1 = data cache)
        builder.call(fn, [at, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _match_line(typingctx, tab, slot, key):  # noqa: ARG001
    """The bucket at ``slot`` (its first slot) compared as one vector: bit 2l set where lane l's
    key equals ``key``, bit 8 + 2l + 1 where lane l's row is ``EMPTY``. One load of the whole
    cache line (8 int64: key, row, key, row, ...), two vector compares."""
    sig = types.int64(tab, slot, key)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], zero], wraparound=False)
        i64 = ir.IntType(64)
        vec_t = ir.VectorType(i64, 8)
        line = builder.load(builder.bitcast(ptr, vec_t.as_pointer()), align=8)  # aligned in practice
        undef = ir.Constant(vec_t, ir.Undefined)
        one = builder.insert_element(undef, args[2], ir.Constant(ir.IntType(32), 0))
        keys = builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        same = builder.bitcast(builder.icmp_signed("==", line, keys), ir.IntType(8))
        empty = builder.bitcast(builder.icmp_signed("==", line, ir.Constant(vec_t, [EMPTY] * 8)), ir.IntType(8))
        return builder.or_(builder.zext(same, i64), builder.shl(builder.zext(empty, i64), i64(8)))

    return sig, codegen


# ---- the probe rules ---------------------------------------------------------------------------
@njit(inline="always")
def _geometry(tab):
    """(mask, shift) of a table: slots wrap with ``& mask``; :func:`_bucket` keeps the top
    ``64 - shift`` bits. Capacities are powers of two, at least ``_MIN_CAPACITY``."""
    cap = tab.shape[0]
    bits = 6
    while (1 << bits) < cap:
        bits += 1
    return cap - 1, np.uint64(64 - bits + 2)  # 2: four slots per bucket


@njit(inline="always")
def _bucket(key, shift):
    """Home bucket: fold the high half into the low half, then Fibonacci (multiply-shift)
    hashing, whose top bits depend on every input bit. Cheaper than SplitMix64, and the hash
    only affects probe length, never correctness."""
    u = np.uint64(key)
    return ((u >> np.uint64(32)) ^ u) * _GOLDEN >> shift


@njit(inline="always")
def _home(key, shift):
    """Home slot: the first slot of the home bucket, as a signed position."""
    return np.int64(_bucket(key, shift)) * _BUCKET


@njit(inline="always")
def _uhome(key, shift):
    """:func:`_home` as an unsigned position (numba adds no negative-index fix-up to those)."""
    return _bucket(key, shift) << np.uint64(2)


@njit(inline="always")
def _guard_key(slot, mask, shift):
    """A key whose home bucket (:func:`_bucket`) is the one after ``slot``'s: ``_bucket`` run
    backwards (multiply by GOLDEN's inverse, then undo the fold of the high half)."""
    after = np.uint64(((slot >> 2) + 1) & (mask >> 2))
    x = (after << shift) * _GOLDEN_INV  # x * GOLDEN == after << shift
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


@njit(inline="always")
def _probe_line(tab, pos, key):
    """(row, go_on) from the home bucket alone (``pos`` its first slot, unsigned): the key's row if
    the bucket holds it; else row -1, and go_on when the bucket is full (the key may lie further:
    :func:`_walk` from the next bucket), not when it has an empty slot (the key is absent)."""
    m = _match_line(tab, pos, key)
    hit = m & 0x55
    if hit != 0:
        return tab[pos + np.uint64(trailing_zeros(hit) >> 1), 1], False
    return -1, (m & 0xAA00) == 0


@njit(inline="always")
def _walk(tab, umask, pos, key):
    """Row of ``key`` searching on from slot ``pos`` (unsigned), -1 if absent."""
    while True:
        if tab[pos, 0] == key:
            return tab[pos, 1]
        if tab[pos, 1] == EMPTY:
            return -1
        pos = (pos + np.uint64(1)) & umask


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
    umask = np.uint64(mask)
    n = keys.shape[0]
    for i in range(n + _FIND_AHEAD):
        if i < n:
            _prefetch(tab, _uhome(keys[i], shift), 0)
        j = i - _FIND_AHEAD
        if j >= 0:
            pos = _uhome(keys[j], shift)
            r, go_on = _probe_line(tab, pos, keys[j])
            if go_on:
                r = _walk(tab, umask, (pos + np.uint64(_BUCKET)) & umask, keys[j])
            out[j] = r if r >= 0 else missing


@njit(inline="always")
def _prefetch_row(values, r):
    """Prefetches every cache line of ``values[r]``: a constant step in bytes compiles to
    straight-line prefetches (a step in elements, computed from the dtype, cost ~8% of a copy)."""
    for offset in range(0, values.shape[1] * values.itemsize, _CACHE_LINE):
        _prefetch(values, r, offset)


@njit(inline="always")
def _copy_row(values, r, out, k):
    """``out[k] = values[r]`` (``r``, ``k`` unsigned: numba adds no negative-index fix-up)."""
    for c in range(values.shape[1]):
        out[k, c] = values[r, c]


@_kernel
def _gather_rows(tab, keys, values, missing, out):
    """``out[i] = values[row of keys[i]]`` (``values[missing]`` if absent), pipelined: while key
    i's row is copied, key i + _AHEAD's row, key i + _AHEAD + _WALK_AHEAD's walk past a full home
    bucket (if any) and the home bucket of key i + 2 * _AHEAD + _WALK_AHEAD are being fetched.
    ``ring`` holds each probed key's row, or ``-1 - slot`` where its walk goes on from ``slot``."""
    mask, shift = _geometry(tab)
    umask = np.uint64(mask)
    n = keys.shape[0]
    ring = np.empty(_RING, dtype=np.int64)
    for i in range(n + 2 * _AHEAD + _WALK_AHEAD):
        if i < n:
            _prefetch(tab, _uhome(keys[i], shift), 0)
        j = i - _AHEAD
        if 0 <= j < n:
            pos = _uhome(keys[j], shift)
            r, go_on = _probe_line(tab, pos, keys[j])
            if go_on:
                pos = (pos + np.uint64(_BUCKET)) & umask
                _prefetch(tab, pos, 0)
                r = -1 - np.int64(pos)
            elif r < 0:
                r = missing
            ring[j & (_RING - 1)] = r
        j = i - _AHEAD - _WALK_AHEAD
        if 0 <= j < n:
            r = ring[j & (_RING - 1)]
            if r < 0:
                r = _walk(tab, umask, np.uint64(-1 - r), keys[j])
                r = r if r >= 0 else missing
                ring[j & (_RING - 1)] = r
            _prefetch_row(values, np.uint64(r))
        k = i - 2 * _AHEAD - _WALK_AHEAD
        if 0 <= k < n:
            _copy_row(values, np.uint64(ring[k & (_RING - 1)]), out, np.uint64(k))


@_kernel
def _take_rows(values, rows, out):
    """``out[i] = values[rows[i]]``: the copy stage of :func:`_gather_rows`, same prefetching."""
    n = rows.shape[0]
    for i in range(n + _AHEAD):
        if i < n:
            _prefetch_row(values, np.uint64(rows[i]))
        k = i - _AHEAD
        if k >= 0:
            _copy_row(values, np.uint64(rows[k]), out, np.uint64(k))


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
