"""``hw.items``: the item-side features of each item, one message per item, on a compacted topic.

Why a topic of its own: a model trained on item-side slots (``genres``) and item-side numeric
columns must see the same values at serving, where a ``Recommend`` call names only candidate ids.
The replay (or any producer of impressions) publishes what it shows with
:class:`ItemFeaturePublisher`; serving (``serving.item_catalog``) follows the topic from the
beginning and keeps the newest features per item. The key is the item id
(:func:`item_key`), so compaction keeps exactly one message per item.

Wire form: the msgpack envelope of :mod:`streams.wire` (``"v"`` schema version), ``"t": "item"``,
``item_id``, ``event_time_ms``, ``sparse`` (slot -> ids), ``dense`` (the item-side tail of the
dense layout: ``(value, missing)`` per item-side numeric column) and, optionally, ``text`` (what the
LLM rerank reads about the item: ``serving.item_text``). A *tombstone* (the item is
gone) carries ``sparse`` and ``dense`` as nil. It is an ordinary message rather than a Kafka null
value so that it goes through every producer the same way; a null value with an item key (what a
tool or Kafka Connect would send) decodes to a tombstone too.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import xxhash

from streams.events import Impression
from streams.wire import SchemaError, pack, unpack

log = logging.getLogger(__name__)

__all__ = ["ItemFeatures", "item_key", "encode_item_features", "decode_item_features",
           "decode_item_message", "validate_item_features", "item_features_from_impression",
           "features_digest", "ItemFeaturePublisher"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_KEY = struct.Struct(">q")
MAX_TEXT_CHARS = 4096


@dataclass
class ItemFeatures:
    """One item's item-side features at ``event_time_ms``; a tombstone when sparse and dense are None.

    ``sparse[slot]`` is the item's bag of ids in an item-side slot (a slot left out reads as an
    empty bag, as in the joiner); ``dense`` is its item-side dense tail.
    """

    item_id: int
    sparse: dict[str, list[int]] | None
    dense: list[float] | None
    event_time_ms: int
    text: str | None = None  # what an LLM reads about the item (serving.item_text); optional

    @property
    def tombstone(self) -> bool:
        return self.sparse is None and self.dense is None

    @staticmethod
    def deleted(item_id: int, event_time_ms: int) -> "ItemFeatures":
        """The tombstone of ``item_id``: serving forgets the item (it reads as unknown)."""
        return ItemFeatures(item_id, None, None, event_time_ms)


def item_key(item_id: int) -> bytes:
    """The Kafka key of an item's messages: its id as 8 big-endian bytes (two's complement)."""
    return _KEY.pack(item_id)


def _int64(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not _INT64_MIN <= x <= _INT64_MAX:
        raise SchemaError(f"{name} must be a 64-bit integer, got {x!r}")
    return x


def _ids(name: str, xs: Any) -> list[int]:
    if not isinstance(xs, list):
        raise SchemaError(f"{name} must be a list of integers")
    if xs:
        try:
            arr = np.array(xs)  # > int64 -> 'u' or 'O'; floats 'f'; ragged/mixed 'O'; nested: ndim 2
            kind = arr.dtype.kind if arr.ndim == 1 else "O"
        except (ValueError, OverflowError):
            kind = "O"
        if kind != "i" or any(isinstance(x, bool) for x in xs):
            raise SchemaError(f"{name} must be a list of 64-bit integers")
    return xs


def _dense(name: str, xs: Any) -> None:
    if not isinstance(xs, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in xs):
        raise SchemaError(f"{name} must be a list of numbers")
    if not all(math.isfinite(x) for x in xs):
        raise SchemaError(f"{name} must hold finite numbers")


def validate_item_features(f: ItemFeatures) -> ItemFeatures:
    """Checks types and shapes; raises :class:`SchemaError` naming the bad field."""
    _int64("item_id", f.item_id)
    if _int64("event_time_ms", f.event_time_ms) < 0:
        raise SchemaError(f"event_time_ms must be >= 0 (ms since the epoch), got {f.event_time_ms}")
    if (f.sparse is None) != (f.dense is None):
        raise SchemaError("sparse and dense are both nil (a tombstone) or both given")
    if f.sparse is None:
        return f
    if not isinstance(f.sparse, dict):
        raise SchemaError("sparse must be a map of slot -> ids")
    for slot, ids in f.sparse.items():
        if not isinstance(slot, str) or not slot:
            raise SchemaError(f"sparse slot names must be non-empty strings, got {slot!r}")
        _ids(f"sparse[{slot!r}]", ids)
    _dense("dense", f.dense)
    if f.text is not None and (not isinstance(f.text, str) or len(f.text) > MAX_TEXT_CHARS):
        raise SchemaError(f"text must be a string of at most {MAX_TEXT_CHARS} characters")
    return f


def encode_item_features(f: ItemFeatures) -> bytes:
    """The message value of ``f`` (validated first, so a bad one fails at the producer)."""
    validate_item_features(f)
    obj = {"t": "item", "item_id": f.item_id, "event_time_ms": f.event_time_ms, "sparse": f.sparse, "dense": f.dense}
    if f.text is not None and not f.tombstone:
        obj["text"] = f.text
    return pack(obj)


def decode_item_features(data: bytes) -> ItemFeatures:
    """An :class:`ItemFeatures` from a message value; :class:`SchemaError` on anything malformed."""
    obj = unpack(data)
    if obj.get("t") != "item":
        raise SchemaError(f"not an item-features message (type {obj.get('t')!r})")
    missing = {"item_id", "event_time_ms", "sparse", "dense"} - obj.keys()
    if missing:
        raise SchemaError(f"item-features message lacks {sorted(missing)}")
    f = validate_item_features(ItemFeatures(obj["item_id"], obj["sparse"], obj["dense"],
                                            obj["event_time_ms"], obj.get("text")))
    if f.dense is not None:
        f.dense = [float(x) for x in f.dense]  # another producer may have sent integers
    return f


def decode_item_message(key: bytes | None, value: bytes | None, timestamp_ms: int = 0) -> ItemFeatures:
    """One ``hw.items`` record: a null value is a Kafka tombstone of the item its key names; a
    value's item id must match its key (when there is one)."""
    if value is None:
        if key is None or len(key) != _KEY.size:
            raise SchemaError("a null value (tombstone) needs an 8-byte item key")
        return ItemFeatures.deleted(_KEY.unpack(key)[0], max(int(timestamp_ms), 0))
    f = decode_item_features(value)
    if key is not None and key != item_key(f.item_id):
        raise SchemaError(f"message key {key.hex()} does not name item {f.item_id}")
    return f


def item_features_from_impression(imp: Impression, item_slots: Sequence[str],
                                  item_dense_width: int) -> list[ItemFeatures]:
    """Each shown item's features as the joiner turns them into examples: its bag in every
    item-side slot the impression carries, and the last ``item_dense_width`` columns of its dense
    row (zeros when the impression has no dense rows: the joiner's zeros). An item shown twice
    in one impression keeps its last row."""
    if item_dense_width < 0:
        raise ValueError(f"item_dense_width must be >= 0, got {item_dense_width}")
    slots = [s for s in item_slots if s in imp.item_sparse]
    out: dict[int, ItemFeatures] = {}
    for k, item in enumerate(imp.items):
        if item_dense_width == 0:
            tail: list[float] = []
        elif imp.dense is None:
            tail = [0.0] * item_dense_width
        else:
            row = imp.dense[k]
            if len(row) < item_dense_width:
                raise ValueError(f"dense row of width {len(row)} has no {item_dense_width}-column item tail")
            tail = [float(x) for x in row[len(row) - item_dense_width:]]
        out[item] = ItemFeatures(item, {s: list(imp.item_sparse[s][k]) for s in slots}, tail,
                                 imp.event_time_ms)
    return list(out.values())


def features_digest(f: ItemFeatures) -> int:
    """An 8-byte digest (xxh64) of what serving would store for ``f``: slots in name order, ids as
    int64, dense as float32 (serving's precision). Equal digests: nothing to re-send."""
    h = xxhash.xxh64(seed=0)
    if f.tombstone:
        h.update(b"\x00tombstone")
        return h.intdigest()
    for slot in sorted(f.sparse):
        h.update(slot.encode() + b"\x1f")
        h.update(np.asarray(f.sparse[slot], "<i8").tobytes() + b"\x1e")
    h.update(b"\x1d" + np.asarray(f.dense, "<f4").tobytes())
    if f.text is not None:
        h.update(b"\x1c" + f.text.encode())
    return h.intdigest()


class _Producer(Protocol):
    def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any: ...


class ItemFeaturePublisher:
    """Publishes an item's features to ``hw.items`` only when they changed since it last sent them.

    Memory is bounded: it remembers one 8-byte digest per item for at most ``max_items`` items,
    least recently observed forgotten first; a forgotten item is simply sent again when next seen
    (the topic is compacted, a repeat costs one message). ``producer`` is a
    ``streams.kafka_producer.BatchProducer`` (flushed by its owner, with the rest of its output).
    ``texts`` (item -> text, e.g. a log's text columns) rides along as each item's ``text``.
    """

    def __init__(self, producer: _Producer, topic: str, item_slots: Sequence[str],
                 item_dense_width: int, max_items: int = 1_000_000,
                 texts: Mapping[int, str] | None = None) -> None:
        if max_items <= 0:
            raise ValueError(f"max_items must be positive, got {max_items}")
        self.producer, self.topic = producer, topic
        self.item_slots = tuple(item_slots)
        self.item_dense_width = int(item_dense_width)
        self.max_items = max_items
        self.texts = texts or {}
        self._digests: dict[int, int] = {}
        self.sent = 0
        self.unchanged = 0

    def observe(self, imp: Impression) -> int:
        """Publishes the changed features of the items ``imp`` shows; returns messages sent."""
        sent = 0
        for f in item_features_from_impression(imp, self.item_slots, self.item_dense_width):
            f.text = self.texts.get(f.item_id)
            sent += self.publish(f)
        return sent

    def publish(self, f: ItemFeatures) -> bool:
        """Sends ``f`` unless it equals what was last sent for its item; True when sent."""
        digest = features_digest(f)
        last = self._digests.pop(f.item_id, None)
        self._digests[f.item_id] = digest  # (re)inserted last: the most recently observed
        if last == digest:
            self.unchanged += 1
            return False
        self.producer.send(self.topic, encode_item_features(f), key=item_key(f.item_id))
        self.sent += 1
        while len(self._digests) > self.max_items:
            del self._digests[next(iter(self._digests))]
        return True

    def delete(self, item_id: int, event_time_ms: int) -> None:
        """Publishes the item's tombstone: serving forgets it."""
        self.publish(ItemFeatures.deleted(item_id, event_time_ms))
