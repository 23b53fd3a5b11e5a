"""Columnar training examples (the payload of ``hw.examples``) and their wire form.

Columns travel as raw little-endian buffers inside the msgpack envelope and decode with
``np.frombuffer``: no per-example Python on either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streams.wire import SchemaError, pack, unpack


@dataclass
class Ragged:
    """A batch of variable-length id lists: ``values`` concatenated, ``lengths[i]`` ids for row i."""

    values: np.ndarray  # int64[m]
    lengths: np.ndarray  # int32[n]

    @property
    def offsets(self) -> np.ndarray:
        """int64[n + 1] start offsets (``values[offsets[i]:offsets[i+1]]`` is row i)."""
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def take(self, index: np.ndarray) -> "Ragged":
        """Rows ``index`` (in that order), vectorised via a repeat/arange gather."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        starts = self.offsets[:-1][index]
        total = int(lengths.sum())
        row_start = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        gather = row_start + np.arange(total, dtype=np.int64)
        return Ragged(self.values[gather], lengths.astype(np.int32))

    @staticmethod
    def empty(n: int) -> "Ragged":
        return Ragged(np.zeros(0, np.int64), np.zeros(n, np.int32))


EMIT_WINDOW = 0  # the label is final: emitted when the request's join window closed
EMIT_EARLY = 1  # early emission: a negative at the hold, or the positive copy of a later click


@dataclass
class ExampleBatch:
    """Columnar training examples: the payload of ``hw.examples`` (see docs/contracts).

    ``emit`` (uint8 per row) says how the joiner emitted the row: :data:`EMIT_WINDOW` or
    :data:`EMIT_EARLY` (a biased stream in which every positive also came once as a negative;
    the trainer corrects for it, :mod:`training.delayed_feedback`). Absent on the wire (older
    messages, windowed joins) it reads as all :data:`EMIT_WINDOW`.
    """

    example_id: np.ndarray  # int64[n]
    user_id: np.ndarray  # int64[n]
    item_id: np.ndarray  # int64[n]
    label: np.ndarray  # float32[n]
    sample_rate: np.ndarray  # float32[n]
    event_time_ms: np.ndarray  # int64[n]
    sparse: dict[str, Ragged]
    dense: np.ndarray  # float32[n, d]
    truth_p: np.ndarray  # float32[n], NaN when unknown
    emit: np.ndarray = field(default=None)  # type: ignore[assignment]  # uint8[n]; None = window

    _COLUMNS = (("example_id", np.int64), ("user_id", np.int64), ("item_id", np.int64),
                ("label", np.float32), ("sample_rate", np.float32),
                ("event_time_ms", np.int64), ("truth_p", np.float32))

    def __post_init__(self) -> None:
        if self.emit is None:
            self.emit = np.zeros(len(self.example_id), np.uint8)

    def __len__(self) -> int:
        return len(self.example_id)

    @property
    def early(self) -> np.ndarray:
        """bool[n]: rows of an early-emitted (delayed-feedback) stream."""
        return self.emit == EMIT_EARLY

    def take(self, index: np.ndarray) -> "ExampleBatch":
        """The rows ``index`` (a boolean mask or integer indices) as a new batch."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        cols = {name: getattr(self, name)[index] for name, _ in self._COLUMNS}
        return ExampleBatch(**cols, sparse={k: r.take(index) for k, r in self.sparse.items()},
                            dense=self.dense[index], emit=self.emit[index])

    @staticmethod
    def concat(batches: list["ExampleBatch"]) -> "ExampleBatch":
        """One batch from many; a slot missing from some batch gets empty lists there."""
        if not batches:
            return ExampleBatch.empty()
        widths = {b.dense.shape[1] for b in batches if len(b)}
        if len(widths) > 1:
            raise SchemaError(f"cannot concat batches with dense widths {sorted(widths)}")
        d = widths.pop() if widths else 0
        cols = {name: np.concatenate([getattr(b, name) for b in batches]).astype(dt, copy=False)
                for name, dt in ExampleBatch._COLUMNS}
        slots = sorted({s for b in batches for s in b.sparse})
        sparse = {}
        for s in slots:
            parts = [b.sparse.get(s) or Ragged.empty(len(b)) for b in batches]
            sparse[s] = Ragged(np.concatenate([p.values for p in parts]).astype(np.int64, copy=False),
                               np.concatenate([p.lengths for p in parts]).astype(np.int32, copy=False))
        dense = np.concatenate([b.dense.reshape(len(b), d) for b in batches]).astype(np.float32, copy=False)
        emit = np.concatenate([b.emit for b in batches]).astype(np.uint8, copy=False)
        return ExampleBatch(**cols, sparse=sparse, dense=dense, emit=emit)

    @staticmethod
    def empty() -> "ExampleBatch":
        cols = {name: np.zeros(0, dt) for name, dt in ExampleBatch._COLUMNS}
        return ExampleBatch(**cols, sparse={}, dense=np.zeros((0, 0), np.float32))


def encode_examples(batch: ExampleBatch) -> bytes:
    n = len(batch)
    msg: dict[str, Any] = {"t": "ex", "n": n}
    for name, dt in ExampleBatch._COLUMNS:
        col = np.ascontiguousarray(getattr(batch, name), dtype=np.dtype(dt).newbyteorder("<"))
        if col.shape != (n,):
            raise SchemaError(f"column {name} has shape {col.shape}, want ({n},)")
        msg[name] = col.tobytes()
    msg["sparse"] = {s: [np.ascontiguousarray(r.values, "<i8").tobytes(),
                         np.ascontiguousarray(r.lengths, "<i4").tobytes()]
                     for s, r in batch.sparse.items()}
    dense = np.ascontiguousarray(batch.dense, "<f4").reshape(n, -1) if n else batch.dense
    msg["dense"] = [int(dense.shape[1]) if dense.ndim == 2 else 0, dense.tobytes()]
    if batch.emit.any():  # windowed batches keep the older wire form, byte for byte
        msg["emit"] = np.ascontiguousarray(batch.emit, np.uint8).tobytes()
    return pack(msg)


def _column(name: str, buf: Any, dtype: str, n: int | None) -> np.ndarray:
    if not isinstance(buf, bytes):
        raise SchemaError(f"column {name} is not a byte buffer")
    size = np.dtype(dtype).itemsize
    if len(buf) % size or (n is not None and len(buf) != n * size):
        raise SchemaError(f"column {name} has {len(buf)} bytes, want {n} x {size}")
    return np.frombuffer(bytearray(buf), dtype=dtype).astype(dtype[1:], copy=False)


def decode_examples(data: bytes) -> ExampleBatch:
    """Inverse of :func:`encode_examples`; any malformed column raises :class:`SchemaError`."""
    obj = unpack(data)
    if obj.get("t") != "ex":
        raise SchemaError(f"not an example batch (type {obj.get('t')!r})")
    n = obj.get("n")
    if not isinstance(n, int) or n < 0:
        raise SchemaError("example batch has no valid row count")
    dt = {np.int64: "<i8", np.float32: "<f4"}
    cols = {name: _column(name, obj.get(name), dt[t], n) for name, t in ExampleBatch._COLUMNS}
    sparse = {}
    raw_sparse = obj.get("sparse") or {}
    if not isinstance(raw_sparse, dict):
        raise SchemaError("sparse is not a map of slot -> [values, lengths]")
    for slot, pair in raw_sparse.items():
        if not isinstance(slot, str):
            raise SchemaError(f"sparse slot name {slot!r} is not a string")
        if not isinstance(pair, list) or len(pair) != 2:
            raise SchemaError(f"sparse slot {slot!r} is not [values, lengths]")
        lengths = _column(f"{slot}.lengths", pair[1], "<i4", n)
        values = _column(f"{slot}.values", pair[0], "<i8", None)
        if (lengths < 0).any() or int(lengths.sum()) != len(values):
            raise SchemaError(f"sparse slot {slot!r}: lengths do not match values")
        sparse[slot] = Ragged(values, lengths)
    dense_pair = obj.get("dense")
    if not isinstance(dense_pair, list) or len(dense_pair) != 2 or not isinstance(dense_pair[0], int) \
            or dense_pair[0] < 0:
        raise SchemaError("dense is not [width >= 0, buffer]")
    d = dense_pair[0]
    dense = _column("dense", dense_pair[1], "<f4", n * d).reshape(n, d)
    emit = _column("emit", obj["emit"], "|u1", n) if "emit" in obj else None
    if emit is not None and (emit > EMIT_EARLY).any():
        raise SchemaError(f"emit holds an unknown kind (want {EMIT_WINDOW} or {EMIT_EARLY})")
    return ExampleBatch(**cols, sparse=sparse, dense=dense, emit=emit)
