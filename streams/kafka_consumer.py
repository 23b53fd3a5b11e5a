"""Reading Kafka: a consumer-group member that commits only what was made durable, and
group-less reads of a whole topic or of where it ends.

Why by hand: auto-commit would commit offsets of input whose output is not durable yet; every
stage commits :func:`next_offsets` of what it processed (see :mod:`streams.kafka_io`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import (CommitFailedError, IllegalGenerationError, KafkaError,
                          RebalanceInProgressError, UnknownMemberIdError)
from kafka.structs import OffsetAndMetadata

from streams.fetch_answers import FetchAnswers
from streams.kafka_io import KafkaConfig

log = logging.getLogger(__name__)


@dataclass
class Record:
    """One consumed message, with where it came from (for DLQ reports and commits)."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None
    timestamp_ms: int


class GroupConsumer:
    """A consumer-group member that never auto-commits: callers commit what they made durable."""

    skipped = 0  # input records found gone from the log after a rewind
    # Per rewound partition the offset its first record must have; rewind_to_committed sets a
    # fresh dict on the instance (this empty one, for subclasses built without __init__, is
    # never written to).
    _rewound: dict[tuple[str, int], int] = {}

    def __init__(self, cfg: KafkaConfig, topics: Iterable[str], group_id: str,
                 client_id: str = "hw-consumer", fetch_max_wait_ms: int = 500,
                 track_fetch_answers: bool = False,
                 on_revoke: Callable[[set[tuple[str, int]]], None] | None = None) -> None:
        """``fetch_max_wait_ms``: longest the broker may hold a fetch open waiting for data.

        Tansu answers a waiting fetch only when the wait ends, so on a quiet topic this wait is
        added to every message's latency; latency-sensitive consumers lower it.
        ``track_fetch_answers``: keep :meth:`fetch_answered` (see :mod:`streams.fetch_answers`).
        ``on_revoke``: called inside :meth:`poll` with the partitions a rebalance takes away,
        before any other member can be given them.
        """
        if fetch_max_wait_ms < 0:
            raise ValueError(f"fetch_max_wait_ms must be >= 0, got {fetch_max_wait_ms}")
        self.generation = 0  # counts assignments handed out by the group (each rebalance)
        self._consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, group_id=group_id,
            client_id=client_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_interval_ms=cfg.max_poll_interval_ms, session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=min(1000, cfg.session_timeout_ms // 3),
            fetch_max_bytes=max(52428800, cfg.max_message_bytes),
            max_partition_fetch_bytes=cfg.max_message_bytes, fetch_max_wait_ms=fetch_max_wait_ms,
            enable_incremental_fetch_sessions=not track_fetch_answers)
        self._answers = FetchAnswers(self._consumer) if track_fetch_answers else None
        self._consumer.subscribe(list(topics), listener=_CountAssignments(self, on_revoke))

    def pause(self) -> None:
        """Stops fetching from the assigned partitions; :meth:`poll` still keeps group membership.

        Back-pressure for a consumer with a backlog of work: partitions assigned later (after a
        rebalance) start unpaused.
        """
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        """Fetches again from every paused partition. Their ends are unknown again until the next
        fetch answers (what the last one said went stale while nothing was fetched), so
        :meth:`partitions_behind` counts them behind meanwhile."""
        paused = self._consumer.paused()
        if paused:
            subs = self._consumer._subscription
            for tp in paused:
                state = subs.assignment.get(tp)
                if state is not None:
                    state.highwater = None
            self._consumer.resume(*paused)

    def paused(self) -> set[tuple[str, int]]:
        """The (topic, partition)s not being fetched."""
        return {(tp.topic, tp.partition) for tp in self._consumer.paused()}

    def poll(self, timeout_ms: int = 200, max_records: int = 1000) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        out = []
        for tp, msgs in batches.items():
            out.extend(Record(tp.topic, tp.partition, m.offset, m.value, m.key, m.timestamp)
                       for m in msgs)
        if self._rewound and out:
            self._check_rewound(out)
        return out

    def commit(self, next_offsets: dict[tuple[str, int], int]) -> None:
        """Commits ``{(topic, partition): next offset to read}`` synchronously.

        Raises :class:`CommitFailedError` for every way a rebalance refuses it (in progress, a
        new generation, this member forgotten): the partitions may have moved, the input is
        read again by whoever owns them."""
        if not next_offsets:
            return
        try:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                                   for (t, p), o in next_offsets.items()})
        except (RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError) as exc:
            raise CommitFailedError(str(exc)) from exc

    def rewind_to_committed(self) -> dict[tuple[str, int], int]:
        """Seeks every assigned partition to its committed offset (the log start, ``-1`` in the
        result, when none was committed); returns them.

        No ListOffsets request: callers rewind between polls, where the group allows
        ``max_poll_interval_ms``, and Tansu on S3 storage answers ListOffsets in seconds on a
        long log (1.5-4 s at 6,000 batches a partition), which cost the joiners their group
        membership at every rebuild, again and again. A log start is looked up inside
        :meth:`poll` (kafka-python resets positions asynchronously there). A committed offset
        that the log no longer holds (retention) shows as a gap before the first record read
        after the rewind, logged as an error by :meth:`poll`.
        """
        out = {}
        self._rewound = {}
        for tp in self._consumer.assignment():
            committed = self._consumer.committed(tp)
            if committed is None:
                self._consumer.seek_to_beginning(tp)
                out[(tp.topic, tp.partition)] = -1
                continue
            self._consumer.seek(tp, committed)
            self._rewound[(tp.topic, tp.partition)] = committed
            out[(tp.topic, tp.partition)] = committed
        return out

    def _check_rewound(self, records: list[Record]) -> None:
        """Errors for input skipped after a rewind: a rewound partition's first record read is
        the committed offset's own, unless the log lost records (retention shorter than the
        time the committed offset stood still)."""
        for r in records:
            expected = self._rewound.pop((r.topic, r.partition), None)
            if expected is not None and r.offset > expected:
                self.skipped += r.offset - expected
                log.error("%s[%d]: records %d..%d, from the committed offset on, are gone from "
                          "the log (retention shorter than the join window?): not read",
                          r.topic, r.partition, expected, r.offset - 1)

    def fetch_answered(self) -> dict[tuple[str, int], float]:
        """Per partition, the monotonic send time of the newest fetch answer applied: what
        :meth:`partitions_behind` says of it is true as of then (needs ``track_fetch_answers``)."""
        if self._answers is None:
            raise RuntimeError("this consumer does not track fetch answers (track_fetch_answers=False)")
        return self._answers.answered

    def partitions_behind(self) -> set[tuple[str, int]]:
        """Assigned (topic, partition)s that still have unread messages (lag > 0).

        Uses the high watermark from the last fetch, so it costs no request; a partition not
        fetched yet counts as behind (we cannot know it is caught up).
        """
        behind = set()
        subs = self._consumer._subscription  # position/highwater without blocking requests
        for tp in self._consumer.assignment():
            state = subs.assignment.get(tp)
            if state is None:
                continue
            if state.highwater is None or state.position is None or \
                    state.highwater > state.position.offset:
                behind.add((tp.topic, tp.partition))
        return behind

    def topics_behind(self) -> set[str]:
        """Topics with an assigned partition that still has unread messages (lag > 0)."""
        return {topic for topic, _ in self.partitions_behind()}

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class _CountAssignments(ConsumerRebalanceListener):
    def __init__(self, owner: GroupConsumer, on_revoke) -> None:
        self._owner, self._on_revoke = owner, on_revoke

    def on_partitions_revoked(self, revoked) -> None:
        if self._on_revoke is not None and revoked:
            self._on_revoke({(tp.topic, tp.partition) for tp in revoked})

    def on_partitions_assigned(self, assigned) -> None:
        self._owner.generation += 1


def next_offsets(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """The offsets to commit after processing ``records``: last offset + 1 per partition."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        if r.offset + 1 > out.get(key, -1):
            out[key] = r.offset + 1
    return out


def log_end(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0,
            partitions: Iterable[int] | None = None) -> dict[int, int]:
    """The next offset a producer would get, per partition of ``topic`` (or of ``partitions``).

    Tansu answers ListOffsets(latest) with the base offset of the partition's last record batch
    plus one, which is short of the end when that batch holds several records. A fetch's high
    watermark is right, so the end is read by fetching the last batch. ``consumer`` must have no
    group (it is re-assigned here: callers assign and seek afterwards). Every reader that asks
    where a topic ends asks here, never ``end_offsets`` directly.
    """
    parts = set(partitions) if partitions is not None else (consumer.partitions_for_topic(topic) or set())
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    if not tps:
        return {}
    listed = consumer.end_offsets(tps)
    ends = {tp.partition: int(listed[tp]) for tp in tps}
    todo = [tp for tp in tps if listed[tp] > 0]
    if not todo:
        return ends
    consumer.assign(todo)
    for tp in todo:
        consumer.seek(tp, int(listed[tp]) - 1)  # the last batch (or the last record)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll(timeout_ms=200, max_records=1)
        marks = {tp: consumer.highwater(tp) for tp in todo}
        if all(m is not None for m in marks.values()):
            ends.update({tp.partition: max(ends[tp.partition], int(m)) for tp, m in marks.items()})
            return ends
    raise TimeoutError(f"no high watermark for {topic} within {timeout_s} s")


def read_topic(cfg: KafkaConfig, topic: str, stop_after: int | None = None,
               idle_s: float = 2.0, timeout_s: float = 120.0) -> list[Record]:
    """Reads a topic from the beginning without a group (tests, benchmarks, inspection).

    Stops after ``stop_after`` records, or when nothing arrived for ``idle_s``, or at ``timeout_s``.
    """
    consumer = KafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, enable_auto_commit=False,
                             group_id=None, fetch_max_bytes=max(52428800, cfg.max_message_bytes),
                             max_partition_fetch_bytes=cfg.max_message_bytes)
    try:
        parts = None
        deadline = time.monotonic() + timeout_s
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.1)
        if not parts:
            raise KafkaError(f"topic {topic} not found")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Record] = []
        last = time.monotonic()
        while time.monotonic() < deadline:
            got = consumer.poll(timeout_ms=200, max_records=10000)
            for tp, msgs in got.items():
                out.extend(Record(tp.topic, tp.partition, m.offset, m.value, m.key, m.timestamp)
                           for m in msgs)
            if got:
                last = time.monotonic()
            if stop_after is not None and len(out) >= stop_after:
                break
            if time.monotonic() - last > idle_s:
                break
        return out
    finally:
        consumer.close()
