"""Sources that push events to Kafka: log replay, the synthetic generator, JSON lines.

A log (CSV, TSV, Parquet or JSON Lines) has user, item, label and time columns (names configurable;
defaults ``user_id,item_id,label,ts``) plus any feature columns, described by a schema that is
inferred and can be overridden by a TOML file (:mod:`streams.log_schema`). Time is epoch seconds,
epoch ms (numbers below 1e11 are seconds) or ISO-8601. Rows of one user at one time form one
request (one impression listing its items); label 1 adds a click at ``ts + 1 ms``. Rows are
replayed in event-time order (stable for equal times). Bad rows stop the replay before anything
is sent, or go to ``hw.dlq`` with their reason (``on_bad_row = "dead-letter"``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from streams import metrics
from streams.events import (Action, DeadLetter, Impression, SchemaError, Watermark, encode_actions,
                            encode_dead_letter, encode_event, encode_impression, event_from_json)
from streams.item_features import ItemFeaturePublisher
from streams.kafka_io import Topics
from streams.kafka_producer import BatchProducer
from streams.log_infer import schema_for
from streams.log_reader import ON_BAD_ROW, BadRow, EncodedLog, encode_log, log_requests, source_name
from streams.log_schema import LogSchema

log = logging.getLogger(__name__)


@dataclass
class ReplayConfig:
    """Configuration of ``headwater replay FILE`` (CSV, TSV, Parquet or JSON Lines)."""

    bootstrap_servers: str = field(default="127.0.0.1:9092", metadata={"help": "Kafka bootstrap servers"})
    topic_prefix: str = field(default="hw", metadata={"help": "topic name prefix"})
    speed: float = field(default=0.0, metadata={"help": "event-time speed-up (2 = twice real time; 0 = max)"})
    final_watermark: bool = field(default=True, metadata={"help": "send an end-of-stream watermark"})
    schema: str = field(default="", metadata={
        "help": "TOML schema file (`headwater replay --inspect FILE` prints one to edit); its column "
                "kinds and sides win over inference; columns it omits are inferred"})
    user_col: str = field(default="", metadata={"help": "user column (default: the schema's, else user_id)"})
    item_col: str = field(default="", metadata={"help": "item column (default: the schema's, else item_id)"})
    label_col: str = field(default="", metadata={
        "help": "label column, 0/1 (default: the schema's, else label)"})
    time_col: str = field(default="", metadata={
        "help": "event-time column: epoch s, epoch ms or ISO-8601 (default: the schema's, else ts)"})
    time_format: str = field(default="", metadata={
        "help": "strptime format of the time column, e.g. '%%m/%%d/%%Y %%H:%%M' (default: the schema's, "
                "else epoch s/ms or ISO-8601, else guessed from the first cells)"})
    item_table: str = field(default="", metadata={
        "help": "item attributes table (CSV, TSV, Parquet, JSON Lines) joined onto every row by "
                "item id; its other columns become item features (default: the schema's items_file)"})
    item_table_key: str = field(default="", metadata={
        "help": "the item table's id column (default: the schema's, else the log's item column)"})
    user_table: str = field(default="", metadata={
        "help": "user attributes table joined onto every row by user id; its other columns become "
                "user features (default: the schema's users_file)"})
    user_table_key: str = field(default="", metadata={
        "help": "the user table's id column (default: the schema's, else the log's user column)"})
    negatives: int = field(default=0, metadata={"help": "sampled negatives per positive row, for a log of positives only (purchases, plays); default: the schema's, 4 for a log without a label column"})
    on_bad_row: str = field(default="error", metadata={
        "help": "a bad row (cell count, label, time, empty id): 'error' stops before anything is "
                "sent, naming file, line and column; 'dead-letter' sends it to <prefix>.dlq"})

    def validate(self) -> None:
        if self.on_bad_row not in ON_BAD_ROW:
            raise ValueError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {self.on_bad_row!r}")
        if self.speed < 0:
            raise ValueError(f"speed must be >= 0, got {self.speed}")

    def column_names(self) -> dict[str, str]:
        """The reserved-column names given as flags (empty ones are left to the schema)."""
        return {k: v for k, v in (("user_col", self.user_col), ("item_col", self.item_col),
                                  ("label_col", self.label_col), ("time_col", self.time_col),
                                  ("time_format", self.time_format),
                                  ("items_file", self.item_table), ("items_key", self.item_table_key),
                                  ("users_file", self.user_table), ("users_key", self.user_table_key),
                                  ("negatives", self.negatives)) if v}


def log_schema(path: str | Path, cfg: ReplayConfig) -> LogSchema:
    """The schema ``cfg`` reads ``path`` with: the schema file, flags, and inference for the rest."""
    overrides = LogSchema.from_toml(cfg.schema) if cfg.schema else None
    return schema_for(path, overrides, **cfg.column_names())


def read_log(path: str | Path, cfg: ReplayConfig | None = None) -> EncodedLog:
    """The log at ``path``, encoded (bad rows raise or are kept aside, per ``cfg.on_bad_row``)."""
    cfg = cfg or ReplayConfig()
    return encode_log(path, log_schema(path, cfg), cfg.on_bad_row)


def load_requests(path: str | Path, cfg: ReplayConfig | None = None
                  ) -> Iterator[tuple[Impression, list[Action]]]:
    """Requests of a log in event-time order (bad rows raise :class:`SchemaError`)."""
    return log_requests(read_log(path, cfg), source_name(path))


def produce_dead_letters(bad_rows: list[BadRow], path: str | Path, producer: BatchProducer,
                         topics: Topics) -> int:
    """Sends each bad row to the dead-letter topic: reason with file, line and column; the
    row's text as payload (``topic`` names the file, ``offset`` its line)."""
    for b in bad_rows:
        producer.send(topics.dlq, encode_dead_letter(DeadLetter(
            b.message(path), str(path), 0, b.line, b.raw.encode())))
    producer.flush()
    return len(bad_rows)


class Pacer:
    """Sleeps so event time advances ``speed`` times faster than wall time (0 = no pacing)."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._origin: tuple[float, int] | None = None

    def anchor(self, event_time_ms: int) -> None:
        """Pins event time ``event_time_ms`` to now (default: the first event's): earlier event
        times are due already and go out unpaced."""
        self._origin = (time.monotonic(), int(event_time_ms))

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
                     on_progress: Callable[[int], None] | None = None,
                     items: "ItemFeaturePublisher | None" = None) -> int:
    """Sends each request's impression and actions; returns the number of events produced.

    With ``items``, the shown items' item-side features go to ``hw.items`` first (only when
    they changed), so serving holds the features training sees: no train/serve skew.
    """
    pacer, events, last_t = Pacer(speed), 0, 0
    for imp, actions in requests:
        if stop is not None and stop.is_set():
            break
        pacer.wait_for(imp.event_time_ms, stop)
        if items is not None:
            items.observe(imp)
        key = imp.request_id.encode()  # a request's actions share its impression's partition
        producer.send(topics.impressions, encode_impression(imp), key=key)
        if actions:
            producer.send(topics.actions, encode_actions(actions), key=key)
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
    producer.send_to_every_partition(topics.impressions, wm)
    producer.send_to_every_partition(topics.actions, wm)


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
        if isinstance(event, Watermark):  # a promise about every input partition
            producer.send_to_every_partition(topics.impressions, encode_event(event))
            producer.send_to_every_partition(topics.actions, encode_event(event))
        else:
            topic = topics.impressions if isinstance(event, Impression) else topics.actions
            rid = event.request_id if isinstance(event, Impression) else event[0].request_id
            producer.send(topic, encode_event(event), key=rid.encode())
        sent += 1
    producer.flush()
    return sent, rejected
