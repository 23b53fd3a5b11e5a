"""Turns requests (an impression plus the actions that joined it) into an ExampleBatch.

Two emissions (``headwater join --emit``): :func:`build_examples` at window close, labels final;
:func:`build_early` at the request's short hold (every item as a negative) and again for each
positive action that comes later (its positive copy, under :func:`positive_copy_ids`).

Python touches each request once to gather its lists; the per-example work (ids, hashing,
labels, downsampling, ragged features) is NumPy over the whole step's examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from streams.events import (ExampleBatch, Impression, Ragged, SchemaError, keep_negative, mix64,
                            request_hash)
from streams.example_batch import EMIT_EARLY
from streams.ids import row_example_ids
from streams.join_state import PendingAction
from streams.kafka_io import Topics

RESERVED_SLOTS = ("user_id", "item_id")


@dataclass
class ClosedRequest:
    """An impression whose window closed, as its wire map, with the actions stored for it."""

    impression: dict
    actions: list[PendingAction]


@dataclass
class Unjoined:
    """An action that reached a request but could not label any of its items."""

    request_id: str
    action: PendingAction
    reason: str  # "no_such_item" | "outside_window"


def check_input(event: object, topic: str, topics: Topics, dense_dim: int) -> None:
    """Raises :class:`SchemaError` for an input event the joiner cannot turn into examples."""
    if isinstance(event, Impression):
        if topic != topics.impressions:
            raise SchemaError(f"impression on topic {topic}")
        width = len(event.dense[0]) if event.dense else 0
        if event.dense is not None and width != dense_dim:
            raise SchemaError(f"dense width {width}, joiner expects {dense_dim}")
        for slot in RESERVED_SLOTS:
            if slot in event.item_sparse or slot in event.user_sparse:
                raise SchemaError(f"slot name {slot!r} is reserved for the id itself")
    elif isinstance(event, list) and topic != topics.actions:
        raise SchemaError(f"actions on topic {topic}")


def positive_copy_ids(example_id: np.ndarray) -> np.ndarray:
    """The id of an early-emitted example's positive copy: distinct from its negative's (so
    de-duplication keeps both) and the same on every replay and for every positive action kind
    (so a second click on the item, or a replayed one, is dropped as a duplicate)."""
    h = np.asarray(example_id, np.int64).view(np.uint64) ^ np.uint64(0x9E3779B97F4A7C15)
    return mix64(h).view(np.int64)


def build_examples(closed: list[ClosedRequest], window_ms: int, positive_kinds: frozenset[str],
                   negative_rate: float, dense_dim: int) -> tuple[ExampleBatch, list[Unjoined], int]:
    """At window close: (examples kept, actions that matched nothing, negatives dropped by
    downsampling)."""
    if not closed:
        return ExampleBatch.empty(), [], 0
    batch, unjoined = _labelled(closed, window_ms, positive_kinds, dense_dim)
    batch.sample_rate = np.where(batch.label > 0, 1.0, negative_rate).astype(np.float32)
    if negative_rate >= 1.0:
        return batch, unjoined, 0
    keep = (batch.label > 0) | keep_negative(batch.example_id, negative_rate)
    return batch.take(keep), unjoined, int(len(batch) - keep.sum())


def build_early(requests: list[ClosedRequest], window_ms: int, positive_kinds: frozenset[str],
                negative_rate: float, dense_dim: int, negatives: bool = True
                ) -> tuple[ExampleBatch, list[Unjoined], int]:
    """Early emission (fake-negative stream, Ktena et al. 2019): with ``negatives``, every shown
    item once as a negative (kept at ``negative_rate``), then a positive copy of each item a
    positive action within the window labelled. So every positive also appears once as a
    negative, whenever its click came: the bias the trainer's correction assumes. Rows are
    marked :data:`~streams.example_batch.EMIT_EARLY`. Returns what :func:`build_examples` does."""
    if not requests:
        return ExampleBatch.empty(), [], 0
    batch, unjoined = _labelled(requests, window_ms, positive_kinds, dense_dim)
    batch.emit = np.full(len(batch), EMIT_EARLY, np.uint8)
    pos = batch.take(batch.label > 0)
    pos.example_id = positive_copy_ids(pos.example_id)
    pos.sample_rate = np.ones(len(pos), np.float32)
    if not negatives:
        return pos, unjoined, 0
    batch.label = np.zeros(len(batch), np.float32)
    batch.sample_rate = np.full(len(batch), negative_rate, np.float32)
    dropped = 0
    if negative_rate < 1.0:
        keep = keep_negative(batch.example_id, negative_rate)
        dropped = int(len(batch) - keep.sum())
        batch = batch.take(keep)
    return ExampleBatch.concat([batch, pos]), unjoined, dropped


def _labelled(closed: list[ClosedRequest], window_ms: int, positive_kinds: frozenset[str],
              dense_dim: int) -> tuple[ExampleBatch, list[Unjoined]]:
    """Every shown item of ``closed`` as one row, labelled 1 where a positive action within the
    window joined it (sample rate 1), and the actions that labelled nothing."""
    objs = [c.impression for c in closed]
    counts = np.fromiter((len(o["items"]) for o in objs), np.int64, len(objs))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    n = int(counts.sum())
    items = np.fromiter(chain.from_iterable(o["items"] for o in objs), np.int64, n)
    req_hash = np.fromiter((request_hash(o["request_id"]) for o in objs), np.uint64, len(objs))
    example_id = row_example_ids(items, np.repeat(req_hash, counts))
    user_id = np.repeat(np.fromiter((o["user_id"] for o in objs), np.int64, len(objs)), counts)
    times = np.fromiter((o["event_time_ms"] for o in objs), np.int64, len(objs))

    label = np.zeros(n, np.float32)
    unjoined: list[Unjoined] = []
    for r, c in enumerate(closed):
        if not c.actions:
            continue
        its = objs[r]["items"]
        for a in c.actions:
            if a.event_time_ms - times[r] > window_ms:
                unjoined.append(Unjoined(objs[r]["request_id"], a, "outside_window"))
                continue
            try:
                k = its.index(a.item_id)
            except ValueError:
                unjoined.append(Unjoined(objs[r]["request_id"], a, "no_such_item"))
                continue
            if a.kind in positive_kinds:
                label[starts[r] + k] = 1.0

    truth: list[float] = []
    for o, k in zip(objs, counts):
        tp = o.get("truth_p")
        truth.extend(tp if tp is not None else [np.nan] * int(k))
    dense = np.zeros((n, dense_dim), np.float32)
    if dense_dim:
        for r, o in enumerate(objs):
            if o.get("dense") is not None:
                dense[starts[r]:starts[r] + counts[r]] = o["dense"]

    row_request = np.repeat(np.arange(len(objs)), counts)
    sparse = {"user_id": Ragged(user_id.copy(), np.ones(n, np.int32)),
              "item_id": Ragged(items.copy(), np.ones(n, np.int32))}
    for slot in sorted({s for o in objs for s in (o.get("user_sparse") or {})}):
        lists = [(o.get("user_sparse") or {}).get(slot, []) for o in objs]
        per_request = Ragged(np.fromiter(chain.from_iterable(lists), np.int64),
                             np.fromiter(map(len, lists), np.int32, len(lists)))
        sparse[slot] = per_request.take(row_request)
    for slot in sorted({s for o in objs for s in (o.get("item_sparse") or {})}):
        rows = list(chain.from_iterable((o.get("item_sparse") or {}).get(slot) or [[]] * len(o["items"])
                                        for o in objs))
        sparse[slot] = Ragged(np.fromiter(chain.from_iterable(rows), np.int64),
                              np.fromiter(map(len, rows), np.int32, n))

    batch = ExampleBatch(example_id=example_id, user_id=user_id, item_id=items, label=label,
                         sample_rate=np.ones(n, np.float32),
                         event_time_ms=np.repeat(times, counts), sparse=sparse, dense=dense,
                         truth_p=np.asarray(truth, np.float32))
    return batch, unjoined
