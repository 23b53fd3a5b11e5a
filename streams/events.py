"""The one event schema: impressions, actions, watermarks and columnar example batches.

Every message on the wire is a msgpack map carrying ``"v"`` (:data:`SCHEMA_VERSION`) and ``"t"``
(its kind), so a consumer can reject a message it does not understand instead of misreading it.
Impressions and actions are small and use plain msgpack lists (the same shape is accepted as JSON
at the CLI, see :func:`event_from_json`); :class:`ExampleBatch` is large and numeric, so its
columns travel as raw little-endian buffers and decode with ``np.frombuffer``, no Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Union

import numpy as np

# One schema, three modules: the envelope, the columnar batch and the ids are re-exported here.
from streams.example_batch import ExampleBatch, Ragged, decode_examples, encode_examples
from streams.ids import example_ids, keep_negative, mix64, request_hash
from streams.wire import SCHEMA_VERSION, SchemaError
from streams.wire import pack as _pack
from streams.wire import unpack as _unpack

__all__ = ["SCHEMA_VERSION", "SchemaError", "Impression", "Action", "Watermark", "DeadLetter",
           "Event", "ExampleBatch", "Ragged", "encode_impression", "encode_actions",
           "encode_watermark", "encode_event", "decode_event", "event_from_json",
           "encode_examples", "decode_examples", "encode_dead_letter", "decode_dead_letter",
           "validate_impression", "validate_action", "example_ids", "keep_negative", "mix64",
           "request_hash"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

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


def encode_dead_letter(d: DeadLetter) -> bytes:
    return _pack({"t": "dead", "reason": d.reason, "topic": d.topic, "partition": d.partition,
                  "offset": d.offset, "payload": d.payload})


def decode_dead_letter(data: bytes) -> DeadLetter:
    obj = _unpack(data)
    if obj.get("t") != "dead":
        raise SchemaError(f"not a dead letter (type {obj.get('t')!r})")
    payload = obj.get("payload")
    if not isinstance(payload, (bytes, bytearray)):  # bytes(N) of an int would allocate N bytes
        raise SchemaError(f"dead letter: payload must be bytes, got {type(payload).__name__}")
    try:
        return DeadLetter(str(obj["reason"]), str(obj["topic"]), int(obj["partition"]),
                          int(obj["offset"]), bytes(payload))
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemaError(f"dead letter: {exc}") from None


def encode_chunks(batch, per_message: int, max_bytes: int) -> list[bytes]:
    """``hw.examples`` payloads of at most ``per_message`` examples, each under ``max_bytes``:
    a chunk that encodes too large (wide sparse features) is halved until it fits."""
    out: list[bytes] = []
    todo = [np.arange(s, min(len(batch), s + per_message)) for s in range(0, len(batch), per_message)]
    while todo:
        idx = todo.pop(0)
        payload = encode_examples(batch.take(idx))
        if len(payload) <= max_bytes or len(idx) == 1:
            out.append(payload)  # a single example over the limit is refused by the producer
        else:
            half = len(idx) // 2
            todo[:0] = [idx[:half], idx[half:]]
    return out
