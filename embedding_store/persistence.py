"""RocksDB snapshots of an :class:`EmbeddingTable` (``rocksdict``, raw byte keys and values).

Layout: each slot's row arrays are cut into fixed blocks of ``BLOCK_ROWS`` rows, one RocksDB value
per block (ids, live flags, update times, row versions, values, optimizer state), plus small
per-slot blobs (free list, expiry log, sketch, RNG state) and one ``meta`` record naming every key
with its CRC32. A full snapshot writes every block into a fresh directory and swaps it in; an
incremental one rewrites only blocks holding a row changed since the last save to that
directory, in one atomic ``WriteBatch`` together with the new ``meta``.

Consistency: the arrays to be written are copied under the table lock (one consistent version),
and written after the lock is released, so lookups continue while RocksDB works.
Integrity: ``load`` checks every record's checksum, size and presence against ``meta`` and raises
:class:`SnapshotCorruptError` instead of restoring anything partial.

The dependency is one-way: :class:`~embedding_store.table.EmbeddingTable` imports this module, and
this module sees a table only through :class:`SnapshotTable` (its slot stores, version, seed, lock)
and builds one on load through the constructor it is given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import zlib
from contextlib import AbstractContextManager
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch
from rocksdict import AccessType, Checkpoint, Options, Rdict, WriteBatch

from embedding_store.slot_store import SlotStore
from embedding_store.slots import SlotConfig

log = logging.getLogger(__name__)

FORMAT = 1
BLOCK_ROWS = 4096
_REC = struct.Struct("<4sI")  # magic, crc32 of payload
_MAGIC = b"HWS1"


class SnapshotCorruptError(RuntimeError):
    """A snapshot that is missing records, truncated or fails its checksums; nothing was loaded."""


class SnapshotTable(Protocol):
    """The parts of a table that a snapshot reads and restores (``EmbeddingTable`` has them)."""

    seed: int
    version: int
    lock: AbstractContextManager
    _stores: dict[str, SlotStore]
    _last_saved: dict[str, object]  # path -> version of the last snapshot written/read there


TableT = TypeVar("TableT", bound=SnapshotTable)


def _frame(payload: bytes) -> bytes:
    return _REC.pack(_MAGIC, zlib.crc32(payload)) + payload


def _unframe(key: str, rec: bytes | None, crc: int | None = None) -> bytes:
    if rec is None:
        raise SnapshotCorruptError(f"snapshot record {key!r} is missing (truncated snapshot?)")
    if len(rec) < _REC.size:
        raise SnapshotCorruptError(f"snapshot record {key!r} is truncated")
    magic, c = _REC.unpack_from(rec)
    payload = rec[_REC.size:]
    if magic != _MAGIC or zlib.crc32(payload) != c or (crc is not None and c != crc):
        raise SnapshotCorruptError(f"snapshot record {key!r} fails its checksum (corrupted)")
    return payload


def _open(path: str) -> Rdict:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_paranoid_checks(True)
    return Rdict(path, opts)


def _arrays_bytes(arrs: list[np.ndarray]) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in arrs)


def _slot_fields(st: SlotStore) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """(name, dtype, per-row shape) of every per-row array, in record order."""
    fields = [("ids", np.dtype("<i8"), ()), ("live", np.dtype("bool"), ()), ("touched", np.dtype("<f8"), ()),
              ("row_version", np.dtype("<i8"), ()), ("values", np.dtype("<f4"), (st.cfg.dim,))]
    for k, t in st.state.items():
        fields.append(("state:" + k, np.dtype("<f4"), tuple(t.shape[1:])))
    return fields


def _column(st: SlotStore, name: str, lo: int, hi: int) -> np.ndarray:
    if name == "values":
        return st.values[lo:hi].detach().cpu().numpy().copy()
    if name.startswith("state:"):
        return st.state[name[6:]][lo:hi].detach().cpu().numpy().copy()
    return getattr(st, name)[lo:hi].copy()


def save_table(table: SnapshotTable, path: str, incremental: bool = True) -> dict:
    """Snapshot ``table`` to the RocksDB directory ``path``; returns what was written."""
    path = os.fspath(path)
    prev = table._last_saved.get(path)
    old_meta = None
    if incremental and prev is not None and os.path.isdir(path):
        try:
            old_meta = _read_meta(path)
        except SnapshotCorruptError:
            old_meta = None
        if old_meta is not None and old_meta["version"] != prev:
            old_meta = None  # someone else wrote there: start over with a full snapshot
    full = old_meta is None
    since = -1 if full else int(old_meta["version"])
    records: dict[str, bytes] = {}
    meta = {"format": FORMAT, "seed": table.seed, "slots": {}}
    with table.lock:  # copy one consistent version; RocksDB writes happen after release
        meta["version"] = table.version
        for name, st in table._stores.items():
            old_slot = None if full else old_meta["slots"].get(name)
            blocks = {} if old_slot is None else dict(old_slot["blocks"])
            nblk = -(-st.capacity // BLOCK_ROWS)
            for b in range(nblk):
                lo, hi = b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, st.capacity)
                key = f"s/{name}/blk/{b:08d}"
                if key in blocks and blocks[key][1] == hi - lo and st.row_version[lo:hi].max() <= since:
                    continue
                payload = _arrays_bytes([_column(st, f, lo, hi) for f, _, _ in _slot_fields(st)])
                records[key] = _frame(payload)
                blocks[key] = [zlib.crc32(payload), hi - lo]
            dels = st.deletions
            small = {
                f"s/{name}/free": st.free.astype("<i8").tobytes(),
                f"s/{name}/dels": json.dumps([[v, len(ids)] for v, ids in dels]).encode()
                + b"\0" + _arrays_bytes([ids.astype("<i8") for _, ids in dels]),
                f"s/{name}/rng": st.generator.get_state().numpy().tobytes(),
            }
            if st.sketch is not None:
                small[f"s/{name}/sketch"] = st.sketch.counts.astype("<i4").tobytes()
            for key, payload in small.items():
                records[key] = _frame(payload)
                blocks[key] = [zlib.crc32(payload), len(payload)]
            meta["slots"][name] = {
                "config": json.loads(st.cfg.to_json()), "capacity": st.capacity, "high": st.high,
                "counters": dict(st.counters), "blocks": blocks,
            }
    meta_rec = _frame(json.dumps(meta, sort_keys=True).encode())
    if full:
        tmp = path.rstrip("/") + ".tmp-snapshot"
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, records, meta_rec)
        old = path.rstrip("/") + ".old-snapshot"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _write(path, records, meta_rec)
    table._last_saved[path] = meta["version"]
    info = {"path": path, "full": full, "version": meta["version"], "records": len(records),
            "bytes": sum(len(r) for r in records.values()) + len(meta_rec)}
    log.info("snapshot %s", info)
    return info


def link_snapshot(table: SnapshotTable, src: str, dst: str) -> None:
    """Makes ``dst`` (which must not exist) a copy of the snapshot at ``src`` at little cost: a
    RocksDB checkpoint of ``src`` opened read-only, whose table files are hard links. ``src`` is
    never written. When ``src`` is where ``table`` last saved, an incremental save of ``table``
    to ``dst`` then writes only what changed since (a checkpoint per directory, at the price of
    an in-place save), and ``table`` no longer counts ``src`` as a place it saves to."""
    src, dst = os.fspath(src), os.fspath(dst)
    try:
        db = Rdict(src, Options(raw_mode=True), access_type=AccessType.read_only())
    except Exception as exc:
        raise SnapshotCorruptError(f"cannot open snapshot {src!r}: {exc}") from exc
    try:
        Checkpoint(db).create_checkpoint(dst)
    finally:
        db.close()
    if src in table._last_saved:  # saves go to dst from now on, never to src again
        table._last_saved[dst] = table._last_saved.pop(src)


def _write(path: str, records: dict[str, bytes], meta_rec: bytes) -> None:
    db = _open(path)
    try:
        wb = WriteBatch(raw_mode=True)
        for key, rec in records.items():
            wb.put(key.encode(), rec)
        wb.put(b"meta", meta_rec)  # same batch: a snapshot is all-or-nothing
        db.write(wb)
        db.flush()
    finally:
        db.close()


def _read_meta(path: str, db: Rdict | None = None) -> dict:
    own = db is None
    try:
        db = _open(path) if own else db
        try:
            meta = json.loads(_unframe("meta", db.get(b"meta")))
        finally:
            if own:
                db.close()
    except SnapshotCorruptError:
        raise
    except Exception as exc:  # RocksDB reports corrupt/truncated files as generic exceptions
        raise SnapshotCorruptError(f"cannot read snapshot {path!r}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise SnapshotCorruptError(f"snapshot {path!r} has unknown format {meta.get('format')!r}")
    return meta


def load_table(path: str, new_table: Callable[..., TableT], device: str | torch.device = "cpu") -> TableT:
    """Restore the table saved at ``path`` bitwise (rows, state, versions, free list, sketch).

    ``new_table(slot_configs, device=..., seed=...)`` builds the empty table the snapshot fills.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no snapshot directory at {path!r}")
    try:
        return _load_checked(path, new_table, device)
    except SnapshotCorruptError as exc:
        # The caller decides between a fallback and refusing to start; the log names the cause.
        log.error("embedding snapshot %s is corrupt, refusing to load it: %s", path, exc)
        raise


def _load_checked(path: str, new_table: Callable[..., TableT], device: str | torch.device) -> TableT:
    try:
        db = _open(path)
    except Exception as exc:
        raise SnapshotCorruptError(f"cannot open snapshot {path!r}: {exc}") from exc
    try:
        meta = _read_meta(path, db)
        cfgs = [SlotConfig(**s["config"]) for s in meta["slots"].values()]
        table = new_table(cfgs, device=device, seed=meta["seed"])
        for name, sm in meta["slots"].items():
            _load_slot(db, table._stores[name], sm)
        table.version = int(meta["version"])
    except SnapshotCorruptError:
        raise
    except Exception as exc:
        raise SnapshotCorruptError(f"cannot read snapshot {path!r}: {exc}") from exc
    finally:
        db.close()
    table._last_saved[path] = table.version
    return table


def _get(db: Rdict, key: str, blocks: dict) -> bytes:
    if key not in blocks:
        raise SnapshotCorruptError(f"snapshot meta lacks record {key!r}")
    crc, size = blocks[key]
    payload = _unframe(key, db.get(key.encode()), crc)
    return payload


def _load_slot(db: Rdict, st: SlotStore, sm: dict) -> None:
    blocks = sm["blocks"]
    st._grow(int(sm["capacity"]))
    fields = _slot_fields(st)
    row_bytes = sum(dt.itemsize * int(np.prod(shape)) for _, dt, shape in fields)
    for b in range(-(-st.capacity // BLOCK_ROWS)):
        lo, hi = b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, st.capacity)
        key = f"s/{st.cfg.name}/blk/{b:08d}"
        payload = _get(db, key, blocks)
        if len(payload) != row_bytes * (hi - lo):
            raise SnapshotCorruptError(f"snapshot record {key!r} has the wrong size")
        off = 0
        for fname, dt, shape in fields:
            cnt = (hi - lo) * int(np.prod(shape))
            arr = np.frombuffer(payload, dtype=dt, count=cnt, offset=off).reshape((hi - lo, *shape))
            off += cnt * dt.itemsize
            if fname == "values":
                st.values[lo:hi] = torch.from_numpy(arr.copy()).to(st.device)
            elif fname.startswith("state:"):
                st.state[fname[6:]][lo:hi] = torch.from_numpy(arr.copy()).to(st.device)
            else:
                getattr(st, fname)[lo:hi] = arr
    st.high = int(sm["high"])
    st.counters = {k: int(v) for k, v in sm["counters"].items()}
    st.free = np.frombuffer(_get(db, f"s/{st.cfg.name}/free", blocks), dtype="<i8").astype(np.int64)
    head, _, body = _get(db, f"s/{st.cfg.name}/dels", blocks).partition(b"\0")
    all_ids = np.frombuffer(body, dtype="<i8").astype(np.int64)
    st.deletions, off = [], 0
    for v, n in json.loads(head):
        st.deletions.append((int(v), all_ids[off:off + n].copy()))
        off += n
    st.generator.set_state(torch.frombuffer(bytearray(_get(db, f"s/{st.cfg.name}/rng", blocks)), dtype=torch.uint8))
    if st.sketch is not None:
        st.sketch.counts[:] = np.frombuffer(
            _get(db, f"s/{st.cfg.name}/sketch", blocks), dtype="<i4").reshape(st.sketch.counts.shape)
    rows = np.flatnonzero(st.live)
    if np.unique(st.ids[rows]).size != rows.size:
        raise SnapshotCorruptError(f"snapshot slot {st.cfg.name!r} has duplicate live ids")
    st.index.insert(st.ids[rows], rows)
