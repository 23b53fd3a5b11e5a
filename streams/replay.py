"""Sources that push events to Kafka: CSV replay, the synthetic generator, JSON lines.

CSV format: header ``user_id,item_id,label,ts`` plus optional feature columns. ``ts`` is event time
in ms since the epoch (values below 1e11 are taken as seconds). Rows of one user at one ``ts``
form one request (one impression message listing its items); ``label`` 1 adds a click at
``ts + 1 ms``. Extra columns: ``dense_*`` become dense features, any other column an item
sparse slot of one id. Rows are replayed in event-time order (stable for equal times).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

import numpy as np

from streams import metrics
from streams.events import (Action, Impression, SchemaError, Watermark, encode_actions,
                            encode_event, encode_impression, event_from_json)
from streams.kafka_io import BatchProducer, Topics

log = logging.getLogger(__name__)


@dataclass
class ReplayConfig:
    """Configuration of ``headwater replay FILE.csv``."""

    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"help": "Kafka bootstrap servers"})
    topic_prefix: str = field(default="hw", metadata={"help": "topic name prefix"})
    speed: float = field(default=0.0, metadata={"help": "event-time speed-up (2 = twice real time; 0 = max)"})
    final_watermark: bool = field(default=True, metadata={"help": "send an end-of-stream watermark"})


def load_csv(path: str | Path) -> Iterator[tuple[Impression, list[Action]]]:
    """Requests of a CSV file in event-time order; malformed files raise SchemaError with a line."""
    try:
        table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8",
                              invalid_raise=True)
    except ValueError as exc:
        raise SchemaError(f"{path}: {exc}") from None
    table = np.atleast_1d(table)
    names = table.dtype.names or ()
    missing = {"user_id", "item_id", "label", "ts"} - set(names)
    if missing:
        raise SchemaError(f"{path}: missing columns {sorted(missing)}")
    for col in ("user_id", "item_id", "label"):
        if not np.issubdtype(table[col].dtype, np.integer):
            raise SchemaError(f"{path}: column {col} must hold integers")
    ts = table["ts"].astype(np.float64)
    if np.isnan(ts).any():
        raise SchemaError(f"{path}: empty or non-numeric ts at data row {int(np.isnan(ts).argmax()) + 1}")
    ts_ms = np.where(ts < 1e11, ts * 1000, ts).astype(np.int64)
    order = np.argsort(ts_ms, kind="stable")
    dense_cols = [c for c in names if c.startswith("dense_")]
    sparse_cols = [c for c in names if c not in ("user_id", "item_id", "label", "ts")
                   and c not in dense_cols]
    for c in sparse_cols:
        if not np.issubdtype(table[c].dtype, np.integer):
            raise SchemaError(f"{path}: feature column {c} must hold integer ids (or be named dense_*)")
    stem = Path(path).stem
    users, ts_sorted = table["user_id"][order], ts_ms[order]
    # Request boundaries: a change of user or time between consecutive rows.
    new = np.ones(len(order), bool)
    new[1:] = (users[1:] != users[:-1]) | (ts_sorted[1:] != ts_sorted[:-1])
    bounds = np.append(np.flatnonzero(new), len(order))
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = table[order[a:b]]
        user, t = int(rows["user_id"][0]), int(ts_sorted[a])
        rid = f"{stem}:{user}:{t}:{a}"
        items = rows["item_id"].tolist()
        imp = Impression(rid, user, t, items,
                         item_sparse={c: [[int(x)] for x in rows[c]] for c in sparse_cols},
                         dense=(np.stack([rows[c] for c in dense_cols], 1).astype(float).tolist()
                                if dense_cols else None))
        clicks = [Action(rid, user, int(i), "click", 1.0, t + 1)
                  for i, lab in zip(items, rows["label"].tolist()) if lab]
        yield imp, clicks


class Pacer:
    """Sleeps so event time advances ``speed`` times faster than wall time (0 = no pacing)."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._origin: tuple[float, int] | None = None

    def wait_for(self, event_time_ms: int, stop: threading.Event | None = None) -> None:
        if self.speed <= 0:
            return
        if self._origin is None:
            self._origin = (time.monotonic(), event_time_ms)
            return
        due = self._origin[0] + (event_time_ms - self._origin[1]) / 1000 / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            (stop.wait(delay) if stop else time.sleep(delay))


def produce_requests(requests: Iterable[tuple[Impression, list[Action]]], producer: BatchProducer,
                     topics: Topics, speed: float = 0.0, final_watermark: bool = True,
                     stop: threading.Event | None = None,
                     on_progress: Callable[[int], None] | None = None) -> int:
    """Sends each request's impression and actions; returns the number of events produced."""
    pacer, events, last_t = Pacer(speed), 0, 0
    for imp, actions in requests:
        if stop is not None and stop.is_set():
            break
        pacer.wait_for(imp.event_time_ms, stop)
        producer.send(topics.impressions, encode_impression(imp))
        if actions:
            producer.send(topics.actions, encode_actions(actions))
        events += len(imp.items) + len(actions)
        last_t = max(last_t, imp.event_time_ms, *(a.event_time_ms for a in actions))
        if on_progress is not None:
            on_progress(events)
    if final_watermark and events:
        send_final_watermark(producer, topics, last_t)
    producer.flush()
    metrics.PRODUCED.labels("replay").inc(events)
    return events


def send_final_watermark(producer: BatchProducer, topics: Topics, last_event_ms: int) -> None:
    """End of stream: promise on both input topics that nothing older than the end will come.

    The promise is ``last event + 1 day``, far beyond any join window, so every pending window
    closes; later streams must then carry later event times (event time never runs backwards).
    """
    wm = encode_event(Watermark(last_event_ms + 86_400_000))
    producer.send(topics.impressions, wm)
    producer.send(topics.actions, wm)


def produce_json_lines(lines: TextIO, producer: BatchProducer, topics: Topics) -> tuple[int, int]:
    """``headwater produce --json``: one JSON event per line -> (sent, rejected) counts.

    A bad line is reported with its number and skipped; the good ones are still sent.
    """
    sent = rejected = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = event_from_json(json.loads(line))
        except (json.JSONDecodeError, SchemaError) as exc:
            log.error("line %d rejected: %s", n, exc)
            rejected += 1
            continue
        if isinstance(event, Watermark):  # a promise about both input topics
            producer.send(topics.impressions, encode_event(event))
            producer.send(topics.actions, encode_event(event))
        else:
            topic = topics.impressions if isinstance(event, Impression) else topics.actions
            producer.send(topic, encode_event(event))
        sent += 1
    producer.flush()
    return sent, rejected
