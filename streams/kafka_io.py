"""Kafka I/O on kafka-python: topic names, a batched producer, a manually committed consumer group.

The commit discipline every stage follows: poll, produce the output, :meth:`BatchProducer.flush`
(raises if any send failed), make local state durable, and only then
:meth:`GroupConsumer.commit` the offsets *of what was processed*. A kill -9 anywhere in between
replays input instead of losing it. Works the same against Apache Kafka and the embedded Tansu.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """The topic names of one Headwater deployment (all share a prefix)."""

    impressions: str
    actions: str
    examples: str
    params: str
    dlq: str
    late: str

    def all(self) -> list[str]:
        return [self.impressions, self.actions, self.examples, self.params, self.dlq, self.late]


def topic_names(prefix: str = "hw") -> Topics:
    """``<prefix>.impressions`` etc.; a fresh prefix gives a fresh, isolated set of topics."""
    return Topics(*(f"{prefix}.{t}" for t in
                    ("impressions", "actions", "examples", "params", "dlq", "late")))


@dataclass
class KafkaConfig:
    """Connection and client tuning shared by every Kafka-using process."""

    bootstrap_servers: str = field(default="127.0.0.1:9092",
                                   metadata={"help": "Kafka bootstrap servers, host:port[,host:port]"})
    topic_prefix: str = field(default="hw", metadata={"help": "topic name prefix (<prefix>.examples ...)"})
    compression: str = field(default="lz4", metadata={"help": "producer compression: lz4, gzip or none"})
    linger_ms: int = field(default=5, metadata={"help": "producer batching delay"})
    batch_bytes: int = field(default=1 << 20, metadata={"help": "producer batch size per partition"})
    max_message_bytes: int = field(default=8 << 20, metadata={"help": "largest message produced/fetched"})
    retries: int = field(default=10, metadata={"help": "producer retries on transient errors"})
    max_poll_interval_ms: int = field(
        default=3000, metadata={"help": "consumer-group rebalance timeout (Tansu needs a few seconds)"})
    session_timeout_ms: int = field(default=10000, metadata={"help": "consumer-group session timeout"})


def admin_client(cfg: KafkaConfig, timeout_s: float = 10.0) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id="hw-admin",
                            request_timeout_ms=int(timeout_s * 1000))


def create_topics(cfg: KafkaConfig, partitions: dict[str, int] | int = 1,
                  prefix: str | None = None) -> Topics:
    """Creates the topic set of ``prefix`` (existing topics are left as they are).

    ``partitions`` is one count for all, or per short name (``{"impressions": 4}``, rest 1).
    """
    topics = topic_names(prefix if prefix is not None else cfg.topic_prefix)
    counts = partitions if isinstance(partitions, dict) else {}
    default = partitions if isinstance(partitions, int) else 1
    admin = admin_client(cfg)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, counts.get(short, default), 1)
               for short, name in zip(("impressions", "actions", "examples", "params", "dlq", "late"),
                                      topics.all())
               if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return topics


class BatchProducer:
    """A KafkaProducer tuned for throughput, whose :meth:`flush` proves every send landed."""

    def __init__(self, cfg: KafkaConfig, client_id: str = "hw-producer") -> None:
        compression = None if cfg.compression in ("", "none") else cfg.compression
        self._producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=client_id, acks="all",
            compression_type=compression, linger_ms=cfg.linger_ms, batch_size=cfg.batch_bytes,
            max_request_size=cfg.max_message_bytes, retries=cfg.retries,
            # Retries must not reorder a partition's messages.
            max_in_flight_requests_per_connection=1)
        self._pending: list = []
        self.sent = 0

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             partition: int | None = None) -> None:
        self._pending.append(self._producer.send(topic, value=value, key=key, partition=partition))
        self.sent += 1

    def flush(self, timeout_s: float | None = 60.0) -> None:
        """Blocks until every message sent so far is acknowledged; raises the first failure."""
        self._producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        for fut in pending:
            if not fut.is_done:
                raise KafkaError("send not acknowledged before flush timeout")
            if fut.failed():
                raise fut.exception

    def close(self) -> None:
        self._producer.close(timeout=10)


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

    def __init__(self, cfg: KafkaConfig, topics: Iterable[str], group_id: str,
                 client_id: str = "hw-consumer", fetch_max_wait_ms: int = 500) -> None:
        """``fetch_max_wait_ms``: longest the broker may hold a fetch open waiting for data.

        Tansu answers a waiting fetch only when the wait ends, so on a quiet topic this wait is
        added to every message's latency; latency-sensitive consumers lower it.
        """
        if fetch_max_wait_ms < 0:
            raise ValueError(f"fetch_max_wait_ms must be >= 0, got {fetch_max_wait_ms}")
        self._consumer = KafkaConsumer(
            *topics, bootstrap_servers=cfg.bootstrap_servers, group_id=group_id,
            client_id=client_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_interval_ms=cfg.max_poll_interval_ms, session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=min(1000, cfg.session_timeout_ms // 3),
            fetch_max_bytes=max(52428800, cfg.max_message_bytes),
            max_partition_fetch_bytes=cfg.max_message_bytes, fetch_max_wait_ms=fetch_max_wait_ms)

    def pause(self) -> None:
        """Stops fetching from the assigned partitions; :meth:`poll` still keeps group membership.

        Back-pressure for a consumer with a backlog of work: partitions assigned later (after a
        rebalance) start unpaused.
        """
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        """Fetches again from every paused partition."""
        paused = self._consumer.paused()
        if paused:
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
        return out

    def commit(self, next_offsets: dict[tuple[str, int], int]) -> None:
        """Commits ``{(topic, partition): next offset to read}`` synchronously."""
        if next_offsets:
            self._consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                                   for (t, p), o in next_offsets.items()})

    def topics_behind(self) -> set[str]:
        """Topics with an assigned partition that still has unread messages (lag > 0).

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
                behind.add(tp.topic)
        return behind

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def next_offsets(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """The offsets to commit after processing ``records``: last offset + 1 per partition."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        if r.offset + 1 > out.get(key, -1):
            out[key] = r.offset + 1
    return out


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
