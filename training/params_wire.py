"""The ``hw.params`` wire format: how the trainer ships parameters to serving replicas.

Every message is one msgpack map (never pickle) carrying ``"w"`` = :data:`WIRE_VERSION`; numeric
arrays travel as raw little-endian buffers, so decoding is ``np.frombuffer``. Kinds:

- ``sparse``: rows of one slot that changed in table versions ``(from_version, version]`` —
  ``ids`` int64[k], ``values`` f32 or f16 [k, dim], ``deleted_ids`` int64[j] (expired rows).
  Large deltas are split into chunks (``chunk_index`` / ``chunk_count`` under one ``publish_id``);
  each chunk is self-contained and can be applied on its own.
- ``dense``: the dense tower as safetensors bytes (``payload``), chunked the same way; a replica
  concatenates the chunks of one ``publish_id`` in ``chunk_index`` order.
- ``snapshot_begin`` / ``snapshot_end``: bracket a full snapshot ``snapshot_id``: every row of every
  slot (``sparse`` messages whose ``snapshot_id`` is set, ``from_version`` = 0) and the dense tower.
  A snapshot is authoritative: a replica that loads it replaces its whole state with it.

Every message carries ``model_id``, ``version`` (the table version the replica is at once it has
applied the message), ``watermark_ms`` (event time of the newest example the parameters include,
so serving can report freshness) and ``snapshot_offset``: the partition offset of the
``snapshot_begin`` marker of the newest *complete* snapshot (-1 before the first).

Bootstrapping a new replica without replaying the topic (all messages go to partition 0):
read the one message at ``end_offset - 1``, seek to its ``snapshot_offset``, load the snapshot up
to its ``snapshot_end`` (same ``snapshot_id``; its ``chunk_count`` is the number of messages of the
snapshot, markers included, so completeness can be checked), then apply every later message in
order. See :mod:`training.params_reader` for a reader that does exactly this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import msgpack
import numpy as np

__all__ = ["WIRE_VERSION", "SPARSE", "DENSE", "SNAPSHOT_BEGIN", "SNAPSHOT_END", "KINDS",
           "ParamsWireError", "ParamsMessage", "encode_params", "decode_params",
           "sparse_chunks", "payload_chunks", "join_payload"]

WIRE_VERSION = 1
SPARSE, DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END = "sparse", "dense", "snapshot_begin", "snapshot_end"
KINDS = (SPARSE, DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END)
_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2")}
_HEADER_BYTES = 512  # generous bound on everything but the arrays, for chunk sizing


class ParamsWireError(ValueError):
    """A ``hw.params`` message is malformed, truncated or of an unknown wire version."""


@dataclass
class ParamsMessage:
    """One ``hw.params`` message (see the module docstring for field meanings)."""

    kind: str
    model_id: str
    version: int
    watermark_ms: int = -1
    publish_id: int = 0
    chunk_index: int = 0
    chunk_count: int = 1
    slot: str = ""
    from_version: int = 0
    snapshot_id: int = -1
    snapshot_offset: int = -1
    dtype: str = "f32"
    dim: int = 0
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    deleted_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    payload: bytes = b""
    created_ms: int = 0

    @property
    def in_snapshot(self) -> bool:
        return self.snapshot_id >= 0

    def values_f32(self) -> np.ndarray:
        """Row values as float32[k, dim] whatever the wire dtype."""
        return self.values.astype(np.float32, copy=False)


def encode_params(msg: ParamsMessage) -> bytes:
    """msgpack bytes of ``msg``; arrays as little-endian raw buffers."""
    if msg.kind not in KINDS:
        raise ParamsWireError(f"unknown kind {msg.kind!r}")
    if msg.dtype not in _DTYPES:
        raise ParamsWireError(f"unknown dtype {msg.dtype!r}; want one of {sorted(_DTYPES)}")
    ids = np.ascontiguousarray(msg.ids, "<i8")
    values = np.ascontiguousarray(msg.values, _DTYPES[msg.dtype])
    if len(ids) and values.shape != (len(ids), msg.dim):
        raise ParamsWireError(f"values shape {values.shape} does not match {len(ids)} ids x dim {msg.dim}")
    obj: dict[str, Any] = {
        "w": WIRE_VERSION, "k": msg.kind, "m": msg.model_id, "ver": int(msg.version),
        "wm": int(msg.watermark_ms), "pid": int(msg.publish_id), "ci": int(msg.chunk_index),
        "cc": int(msg.chunk_count), "s": msg.slot, "fv": int(msg.from_version),
        "sid": int(msg.snapshot_id), "soff": int(msg.snapshot_offset), "dt": msg.dtype,
        "dim": int(msg.dim), "ids": ids.tobytes(), "val": values.tobytes() if len(ids) else b"",
        "del": np.ascontiguousarray(msg.deleted_ids, "<i8").tobytes(), "p": bytes(msg.payload),
        "t": int(msg.created_ms or time.time() * 1000),
    }
    return msgpack.packb(obj, use_bin_type=True)


def _get(obj: dict, key: str, typ: type | tuple[type, ...], name: str) -> Any:
    v = obj.get(key)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise ParamsWireError(f"field {name} missing or of wrong type ({type(v).__name__})")
    return v


def decode_params(data: bytes) -> ParamsMessage:
    """Inverse of :func:`encode_params`; anything malformed raises :class:`ParamsWireError`."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ParamsWireError(f"undecodable params message: {exc}") from None
    if not isinstance(obj, dict):
        raise ParamsWireError("params message is not a map")
    if obj.get("w") != WIRE_VERSION:
        raise ParamsWireError(f"unsupported params wire version {obj.get('w')!r} (want {WIRE_VERSION})")
    kind = _get(obj, "k", str, "kind")
    if kind not in KINDS:
        raise ParamsWireError(f"unknown kind {kind!r}")
    dtype = _get(obj, "dt", str, "dtype")
    if dtype not in _DTYPES:
        raise ParamsWireError(f"unknown dtype {dtype!r}")
    dim = _get(obj, "dim", int, "dim")
    raw_ids, raw_val = _get(obj, "ids", bytes, "ids"), _get(obj, "val", bytes, "values")
    raw_del = _get(obj, "del", bytes, "deleted_ids")
    if len(raw_ids) % 8 or len(raw_del) % 8 or dim < 0:
        raise ParamsWireError("id buffers are not whole int64s")
    k = len(raw_ids) // 8
    itemsize = _DTYPES[dtype].itemsize
    if len(raw_val) != k * dim * itemsize:
        raise ParamsWireError(f"values hold {len(raw_val)} bytes, want {k} x {dim} x {itemsize}")
    ids = np.frombuffer(raw_ids, "<i8").astype(np.int64)
    values = np.frombuffer(raw_val, _DTYPES[dtype]).reshape(k, dim)
    values = values.astype(np.float32 if dtype == "f32" else np.float16)
    ci, cc = _get(obj, "ci", int, "chunk_index"), _get(obj, "cc", int, "chunk_count")
    if cc < 1 or not 0 <= ci < cc:
        raise ParamsWireError(f"chunk {ci} of {cc} is out of range")
    return ParamsMessage(
        kind=kind, model_id=_get(obj, "m", str, "model_id"), version=_get(obj, "ver", int, "version"),
        watermark_ms=_get(obj, "wm", int, "watermark_ms"), publish_id=_get(obj, "pid", int, "publish_id"),
        chunk_index=ci, chunk_count=cc, slot=_get(obj, "s", str, "slot"),
        from_version=_get(obj, "fv", int, "from_version"), snapshot_id=_get(obj, "sid", int, "snapshot_id"),
        snapshot_offset=_get(obj, "soff", int, "snapshot_offset"), dtype=dtype, dim=dim, ids=ids,
        values=values, deleted_ids=np.frombuffer(raw_del, "<i8").astype(np.int64),
        payload=_get(obj, "p", bytes, "payload"), created_ms=_get(obj, "t", int, "created_ms"))


def sparse_chunks(base: ParamsMessage, ids: np.ndarray, values: np.ndarray,
                  deleted_ids: np.ndarray | None = None,
                  max_bytes: int = 1 << 20) -> list[ParamsMessage]:
    """Splits one slot's changed rows into messages each encoding to at most ~``max_bytes``.

    ``base`` supplies the header (kind, model, versions, slot, dtype); ``values`` are converted
    to ``base.dtype``. Deleted ids ride in the last chunks. Always returns at least one message,
    so an empty delta still advances a replica's version and watermark.
    """
    ids = np.asarray(ids, np.int64)
    deleted = np.zeros(0, np.int64) if deleted_ids is None else np.asarray(deleted_ids, np.int64)
    dim = int(values.shape[1]) if values.ndim == 2 else 0
    vals = np.asarray(values).astype(_DTYPES[base.dtype].newbyteorder("="), copy=False)
    if vals.ndim != 2 or len(vals) != len(ids):
        raise ValueError(f"values {vals.shape} do not match {len(ids)} ids")
    budget = max(max_bytes - _HEADER_BYTES, 64)
    row_bytes = 8 + dim * vals.itemsize
    rows_per = max(1, budget // row_bytes)
    pieces: list[tuple[slice, slice]] = []
    r = 0
    while r < len(ids):
        pieces.append((slice(r, r + rows_per), slice(0, 0)))
        r += rows_per
    # Deleted ids fill what the last row chunk left free, then chunks of their own.
    d = 0
    if pieces:
        room = (budget - (len(ids) - pieces[-1][0].start) * row_bytes) // 8
        d = min(len(deleted), max(room, 0))
        pieces[-1] = (pieces[-1][0], slice(0, d))
    while d < len(deleted) or not pieces:
        pieces.append((slice(0, 0), slice(d, d + max(1, budget // 8))))
        d += max(1, budget // 8)
    n = len(pieces)
    return [replace(base, chunk_index=i, chunk_count=n, dim=dim, ids=ids[r], values=vals[r],
                    deleted_ids=deleted[d]) for i, (r, d) in enumerate(pieces)]


def payload_chunks(base: ParamsMessage, payload: bytes, max_bytes: int = 1 << 20) -> list[ParamsMessage]:
    """Splits an opaque payload (dense safetensors bytes) into chunk messages."""
    size = max(max_bytes - _HEADER_BYTES, 64)
    parts = [payload[i:i + size] for i in range(0, len(payload), size)] or [b""]
    return [replace(base, chunk_index=i, chunk_count=len(parts), payload=p)
            for i, p in enumerate(parts)]


def join_payload(chunks: list[ParamsMessage]) -> bytes:
    """Reassembles :func:`payload_chunks`; raises if chunks are missing, duplicated or mixed."""
    if not chunks:
        raise ParamsWireError("no chunks to join")
    pid, count = chunks[0].publish_id, chunks[0].chunk_count
    if any(c.publish_id != pid or c.chunk_count != count for c in chunks):
        raise ParamsWireError("chunks of different publishes")
    by_index = {c.chunk_index: c.payload for c in chunks}
    if sorted(by_index) != list(range(count)):
        raise ParamsWireError(f"have chunks {sorted(by_index)} of {count}")
    return b"".join(by_index[i] for i in range(count))


def iter_rows(messages: list[ParamsMessage]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(slot, ids, float32 values) of every sparse message in order (a convenience for replicas)."""
    for m in messages:
        if m.kind == SPARSE and len(m.ids):
            yield m.slot, m.ids, m.values_f32()
