"""The one event schema: impressions, actions, watermarks and columnar example batches.

Every message on the wire is a msgpack map carrying ``"v"`` (:data:`SCHEMA_VERSION`) and ``"t"``
(its kind), so a consumer can reject a message it does not understand instead of misreading it.
Impressions and actions are small and use plain msgpack lists (the same shape is accepted as JSON
at the CLI, see :func:`event_from_json`); :class:`ExampleBatch` is large and numeric, so its
columns travel as raw little-endian buffers and decode with ``np.frombuffer``, no Python loop.
"""

from __future__ import annotations

import hashlib
import math
from itertools import chain
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack
import numpy as np

SCHEMA_VERSION = 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class SchemaError(ValueError):
    """A message is not valid for this schema (undecodable, wrong version, wrong shape)."""


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


@dataclass
class Impression:
    """One request: the items shown to a user, with per-item and request-level features.

    ``item_sparse[slot][k]`` are the ids of slot ``slot`` for ``items[k]``; ``user_sparse`` holds
    request-level (user/context) ids shared by every item; ``dense`` is ``float32[len(items), d]``.
    ``truth_p`` is the ground-truth click probability per item when a generator knows it.
    """

    request_id: str
    user_id: int
    event_time_ms: int
    items: list[int]
    item_sparse: dict[str, list[list[int]]] = field(default_factory=dict)
    user_sparse: dict[str, list[int]] = field(default_factory=dict)
    dense: list[list[float]] | None = None
    truth_p: list[float] | None = None


@dataclass
class Action:
    """Feedback on one shown item (a click, a purchase, ...); ``value`` carries e.g. dwell time."""

    request_id: str
    user_id: int
    item_id: int
    kind: str = "click"
    value: float = 1.0
    event_time_ms: int = 0


@dataclass
class Watermark:
    """A producer's promise that no later event has an event time below ``event_time_ms``."""

    event_time_ms: int


Event = Union[Impression, list[Action], Watermark]


@dataclass
class DeadLetter:
    """A message the joiner could not use (``hw.dlq``) or an action too late to join (``hw.late``).

    ``payload`` is the original message bytes (or, for late actions, an actions message), so
    nothing is lost: a fixed consumer can re-read it.
    """

    reason: str
    topic: str
    partition: int
    offset: int
    payload: bytes


@dataclass
class ExampleBatch:
    """Columnar training examples: the payload of ``hw.examples`` (see docs/contracts)."""

    example_id: np.ndarray  # int64[n]
    user_id: np.ndarray  # int64[n]
    item_id: np.ndarray  # int64[n]
    label: np.ndarray  # float32[n]
    sample_rate: np.ndarray  # float32[n]
    event_time_ms: np.ndarray  # int64[n]
    sparse: dict[str, Ragged]
    dense: np.ndarray  # float32[n, d]
    truth_p: np.ndarray  # float32[n], NaN when unknown

    _COLUMNS = (("example_id", np.int64), ("user_id", np.int64), ("item_id", np.int64),
                ("label", np.float32), ("sample_rate", np.float32),
                ("event_time_ms", np.int64), ("truth_p", np.float32))

    def __len__(self) -> int:
        return len(self.example_id)

    def take(self, index: np.ndarray) -> "ExampleBatch":
        """The rows ``index`` (a boolean mask or integer indices) as a new batch."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        cols = {name: getattr(self, name)[index] for name, _ in self._COLUMNS}
        return ExampleBatch(**cols, sparse={k: r.take(index) for k, r in self.sparse.items()},
                            dense=self.dense[index])

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
        return ExampleBatch(**cols, sparse=sparse, dense=dense)

    @staticmethod
    def empty() -> "ExampleBatch":
        cols = {name: np.zeros(0, dt) for name, dt in ExampleBatch._COLUMNS}
        return ExampleBatch(**cols, sparse={}, dense=np.zeros((0, 0), np.float32))


# ---------------------------------------------------------------- ids and sampling

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array: a cheap, well-spread 64-bit hash."""
    x = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def request_hash(request_id: str) -> int:
    """A stable 64-bit hash of a request id (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def example_ids(request_id: str, items: np.ndarray) -> np.ndarray:
    """Deterministic int64 example ids of (request_id, item_id) pairs: the de-duplication key."""
    h = mix64(np.asarray(items, dtype=np.int64).view(np.uint64))
    with np.errstate(over="ignore"):
        h = mix64(h ^ np.uint64(request_hash(request_id)))
    return h.view(np.int64)


def keep_negative(example_id: np.ndarray, rate: float) -> np.ndarray:
    """Deterministic downsampling draw: the same example is kept or dropped on every replay."""
    u = (mix64(np.asarray(example_id, np.int64).view(np.uint64) ^ np.uint64(0x5851F42D4C957F2D))
         >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < rate


# ---------------------------------------------------------------- wire encoding


def _pack(obj: dict) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **obj}, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise SchemaError(f"undecodable message: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError("message is not a map")
    if obj.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema version {obj.get('v')!r} (want {SCHEMA_VERSION})")
    return obj


def _int(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not _INT64_MIN <= x <= _INT64_MAX:
        raise SchemaError(f"{name} must be a 64-bit integer, got {x!r}")
    return x


def _ints(name: str, xs: Any) -> list[int]:
    """A list of int64s, checked by one NumPy conversion instead of a Python loop."""
    if not isinstance(xs, list):
        raise SchemaError(f"{name} must be a list of integers")
    if xs:
        try:
            kind = np.array(xs).dtype.kind  # >int64 -> 'u' or 'O'; floats 'f'; nested 'O'
        except (ValueError, OverflowError):
            kind = "O"
        if kind != "i":
            raise SchemaError(f"{name} must be a list of 64-bit integers")
    return xs


def _floats(name: str, xs: list, lo: float = -math.inf, hi: float = math.inf) -> None:
    try:
        arr = np.array(xs)
    except (ValueError, OverflowError):
        arr = np.array([None])
    if arr.dtype.kind not in "if" or not np.isfinite(arr).all():
        raise SchemaError(f"{name} must hold finite numbers")
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise SchemaError(f"{name} must lie in [{lo:g}, {hi:g}]")


def _time(x: Any) -> int:
    if _int("event_time_ms", x) < 0:
        raise SchemaError(f"event_time_ms must be >= 0 (ms since the epoch), got {x}")
    return x


def _str(name: str, x: Any) -> str:
    if not isinstance(x, str) or not x:
        raise SchemaError(f"{name} must be a non-empty string, got {x!r}")
    return x


def _float(name: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise SchemaError(f"{name} must be a finite number, got {x!r}")
    return float(x)


def validate_impression(imp: Impression) -> Impression:
    """Checks types and shapes; raises :class:`SchemaError` naming the bad field."""
    _str("request_id", imp.request_id)
    _int("user_id", imp.user_id)
    _time(imp.event_time_ms)
    n = len(_ints("items", imp.items))
    if n == 0:
        raise SchemaError("impression lists no items")
    if not isinstance(imp.item_sparse, dict) or not isinstance(imp.user_sparse, dict):
        raise SchemaError("item_sparse and user_sparse must be maps of slot -> ids")
    for slot, rows in imp.item_sparse.items():
        _str("slot name", slot)
        if not isinstance(rows, list) or len(rows) != n:
            raise SchemaError(f"item_sparse[{slot!r}] must have one id list per item ({n})")
        if not all(type(row) is list for row in rows):
            raise SchemaError(f"item_sparse[{slot!r}] must hold one list of ids per item")
        _ints(f"item_sparse[{slot!r}]", list(chain.from_iterable(rows)))
    for slot, ids in imp.user_sparse.items():
        _str("slot name", slot)
        _ints(f"user_sparse[{slot!r}]", ids)
    if imp.dense is not None:
        if not isinstance(imp.dense, list) or len(imp.dense) != n:
            raise SchemaError(f"dense must have one row per item ({n})")
        widths = {len(r) if isinstance(r, list) else -1 for r in imp.dense}
        if len(widths) != 1 or -1 in widths:
            raise SchemaError("dense rows must be lists of one width")
        _floats("dense", imp.dense)
    if imp.truth_p is not None:
        if not isinstance(imp.truth_p, list) or len(imp.truth_p) != n:
            raise SchemaError(f"truth_p must have one probability per item ({n})")
        _floats("truth_p", imp.truth_p, 0.0, 1.0)
    return imp


def validate_action(a: Action) -> Action:
    _str("request_id", a.request_id)
    _int("user_id", a.user_id)
    _int("item_id", a.item_id)
    _str("kind", a.kind)
    _float("value", a.value)
    _time(a.event_time_ms)
    return a


_IMP_FIELDS = ("request_id", "user_id", "event_time_ms", "items", "item_sparse", "user_sparse",
               "dense", "truth_p")


def encode_impression(imp: Impression, validate: bool = True) -> bytes:
    """Wire form of one impression; validated first so bad events fail at the producer."""
    if validate:
        validate_impression(imp)
    return _pack({"t": "imp", **{k: getattr(imp, k) for k in _IMP_FIELDS}})


def encode_actions(actions: list[Action]) -> bytes:
    """Several actions in one message, stored column-wise."""
    for a in actions:
        validate_action(a)
    return _pack({"t": "act", "request_id": [a.request_id for a in actions],
                  "user_id": [a.user_id for a in actions], "item_id": [a.item_id for a in actions],
                  "kind": [a.kind for a in actions], "value": [a.value for a in actions],
                  "event_time_ms": [a.event_time_ms for a in actions]})


def encode_watermark(wm: Watermark) -> bytes:
    return _pack({"t": "wm", "event_time_ms": wm.event_time_ms})


def encode_event(event: Event) -> bytes:
    if isinstance(event, Impression):
        return encode_impression(event)
    if isinstance(event, Watermark):
        return encode_watermark(event)
    if isinstance(event, Action):
        return encode_actions([event])
    return encode_actions(list(event))


def _impression_from(obj: dict) -> Impression:
    try:
        imp = Impression(**{k: obj[k] for k in _IMP_FIELDS if k in obj})
    except TypeError as exc:
        raise SchemaError(f"impression: {exc}") from None
    imp.item_sparse = imp.item_sparse if imp.item_sparse is not None else {}
    imp.user_sparse = imp.user_sparse if imp.user_sparse is not None else {}
    return validate_impression(imp)


def _actions_from(obj: dict) -> list[Action]:
    cols = ("request_id", "user_id", "item_id", "kind", "value", "event_time_ms")
    try:
        lists = [obj[c] for c in cols]
    except KeyError as exc:
        raise SchemaError(f"actions message lacks {exc}") from None
    if not all(isinstance(col, list) for col in lists) or len({len(col) for col in lists}) != 1:
        raise SchemaError("actions columns must be lists of one length")
    return [validate_action(Action(*row)) for row in zip(*lists)]


def decode_event(data: bytes) -> Event:
    """An :class:`Impression`, a list of :class:`Action` or a :class:`Watermark`; else SchemaError."""
    obj = _unpack(data)
    kind = obj.get("t")
    if kind == "imp":
        return _impression_from(obj)
    if kind == "act":
        return _actions_from(obj)
    if kind == "wm":
        return Watermark(_int("event_time_ms", obj.get("event_time_ms")))
    raise SchemaError(f"unknown event type {kind!r}")


def event_from_json(obj: dict) -> Event:
    """The CLI's JSON form: ``{"type": "impression"|"action"|"watermark", ...fields}``."""
    if not isinstance(obj, dict):
        raise SchemaError("JSON event must be an object")
    obj = dict(obj)
    kind = obj.pop("type", None)
    if kind == "impression":
        return _impression_from(obj)
    if kind == "action":
        try:
            return [validate_action(Action(**obj))]
        except TypeError as exc:
            raise SchemaError(f"action: {exc}") from None
    if kind == "watermark":
        return Watermark(_int("event_time_ms", obj.get("event_time_ms")))
    raise SchemaError(f"JSON event needs type impression, action or watermark; got {kind!r}")


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
    return _pack(msg)


def encode_dead_letter(d: DeadLetter) -> bytes:
    return _pack({"t": "dead", "reason": d.reason, "topic": d.topic, "partition": d.partition,
                  "offset": d.offset, "payload": d.payload})


def decode_dead_letter(data: bytes) -> DeadLetter:
    obj = _unpack(data)
    if obj.get("t") != "dead":
        raise SchemaError(f"not a dead letter (type {obj.get('t')!r})")
    try:
        return DeadLetter(str(obj["reason"]), str(obj["topic"]), int(obj["partition"]),
                          int(obj["offset"]), bytes(obj["payload"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"dead letter: {exc}") from None


def _column(name: str, buf: Any, dtype: str, n: int | None) -> np.ndarray:
    if not isinstance(buf, bytes):
        raise SchemaError(f"column {name} is not a byte buffer")
    size = np.dtype(dtype).itemsize
    if len(buf) % size or (n is not None and len(buf) != n * size):
        raise SchemaError(f"column {name} has {len(buf)} bytes, want {n} x {size}")
    return np.frombuffer(bytearray(buf), dtype=dtype).astype(dtype[1:], copy=False)


def decode_examples(data: bytes) -> ExampleBatch:
    """Inverse of :func:`encode_examples`; any malformed column raises :class:`SchemaError`."""
    obj = _unpack(data)
    if obj.get("t") != "ex":
        raise SchemaError(f"not an example batch (type {obj.get('t')!r})")
    n = obj.get("n")
    if not isinstance(n, int) or n < 0:
        raise SchemaError("example batch has no valid row count")
    dt = {np.int64: "<i8", np.float32: "<f4"}
    cols = {name: _column(name, obj.get(name), dt[t], n) for name, t in ExampleBatch._COLUMNS}
    sparse = {}
    for slot, pair in (obj.get("sparse") or {}).items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise SchemaError(f"sparse slot {slot!r} is not [values, lengths]")
        lengths = _column(f"{slot}.lengths", pair[1], "<i4", n)
        values = _column(f"{slot}.values", pair[0], "<i8", None)
        if (lengths < 0).any() or int(lengths.sum()) != len(values):
            raise SchemaError(f"sparse slot {slot!r}: lengths do not match values")
        sparse[slot] = Ragged(values, lengths)
    dense_pair = obj.get("dense")
    if not isinstance(dense_pair, list) or len(dense_pair) != 2 or not isinstance(dense_pair[0], int):
        raise SchemaError("dense is not [width, buffer]")
    d = dense_pair[0]
    dense = _column("dense", dense_pair[1], "<f4", n * d).reshape(n, d)
    return ExampleBatch(**cols, sparse=sparse, dense=dense)
