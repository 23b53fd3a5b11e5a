"""Tail one topic on a background thread: every partition, no consumer group, no commits.

What a serving process does with a topic it mirrors into memory (the item catalog on
``hw.items``, the live user history on ``hw.actions``): it wants every partition, starts from the
beginning, the end or a point in time, and never commits (its state lives in memory and is
rebuilt from the topic on restart). A missing topic is waited for; ``caught_up`` says when
everything that was on the topic at start has been handed over; the handler's exceptions stop
the follower and are kept in ``error`` for the owner's health check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["TopicFollower"]

BEGINNING, END = "beginning", "end"


class TopicFollower:
    """Hands each poll's records (``kafka.ConsumerRecord``, in partition order) to ``handle``.

    ``start_at``: ``"beginning"``, ``"end"``, or a timestamp in ms (each partition from its first
    record at or after it; the end where there is none).
    """

    def __init__(self, bootstrap_servers: str, topic: str, handle: Callable[[list[Any]], None], *,
                 start_at: str | int = BEGINNING, client_id: str = "hw-follower",
                 poll_timeout_ms: int = 50, max_records: int = 5000) -> None:
        self.bootstrap_servers, self.topic, self.handle = bootstrap_servers, topic, handle
        self.start_at, self.client_id = start_at, client_id
        self.poll_timeout_ms, self.max_records = poll_timeout_ms, max_records
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._end: dict[int, int] = {}  # partition -> end offset when the follower started
        self._next: dict[int, int] = {}  # partition -> next offset to read
        self.error: BaseException | None = None

    @property
    def caught_up(self) -> bool:
        """True once everything on the topic when the follower started has been handed over."""
        return bool(self._end) and all(self._next.get(p, 0) >= end for p, end in self._end.items())

    def wait_caught_up(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.caught_up and self.error is None:
            time.sleep(0.02)
        return self.caught_up

    def start(self) -> "TopicFollower":
        self._thread = threading.Thread(target=self._run, name=self.client_id, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _seek(self, consumer: Any, tps: list[Any], ends: dict[int, int]) -> None:
        if self.start_at == BEGINNING:
            consumer.seek_to_beginning(*tps)
            return
        if self.start_at == END:
            for tp in tps:
                consumer.seek(tp, ends[tp.partition])
            return
        found = consumer.offsets_for_times({tp: int(self.start_at) for tp in tps})
        for tp in tps:
            at = found.get(tp)
            consumer.seek(tp, at.offset if at is not None else ends[tp.partition])

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from streams.kafka_consumer import log_end

        try:
            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None,
                                     enable_auto_commit=False, fetch_max_wait_ms=self.poll_timeout_ms,
                                     client_id=self.client_id)
        except BaseException as exc:  # surfaced through .error
            self.error = exc
            log.exception("%s could not connect", self.client_id)
            return
        try:
            parts = None
            while not parts and not self._stop.is_set():
                parts = consumer.partitions_for_topic(self.topic)
                if not parts:
                    self._stop.wait(1.0)
            if self._stop.is_set():
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            ends = log_end(consumer, self.topic, partitions=parts)  # re-assigns: before ours
            consumer.assign(tps)
            self._seek(consumer, tps, ends)
            self._next = {tp.partition: consumer.position(tp) for tp in tps}
            self._end = {tp.partition: ends[tp.partition] for tp in tps}
            log.info("%s following %s (%d partitions) from %s", self.client_id, self.topic, len(tps),
                     self.start_at)
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
                records, ends = [], {}
                for tp, msgs in batch.items():
                    records.extend(msgs)
                    if msgs:
                        ends[tp.partition] = msgs[-1].offset + 1
                if records:
                    self.handle(records)
                self._next.update(ends)  # after the handler: caught_up means applied
        except BaseException as exc:
            self.error = exc
            log.exception("%s stopped on an error", self.client_id)
        finally:
            consumer.close()
