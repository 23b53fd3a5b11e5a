"""Kafka I/O on kafka-python: topic names, a batched producer, a manually committed consumer group.

The commit discipline every stage follows: poll, produce the output, :meth:`BatchProducer.flush`
(raises if any send failed), make local state durable, and only then
:meth:`GroupConsumer.commit` the offsets *of what was processed*. A kill -9 anywhere in between
replays input instead of losing it. Works the same against Apache Kafka and the embedded Tansu.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter

log = logging.getLogger(__name__)

PRODUCE_ERRORS = Counter("hw_stream_produce_errors", "sends refused or not delivered within the "
                         "producer's bound", ["topic", "reason"])


@dataclass(frozen=True)
class Topics:
    """The topic names of one Headwater deployment (all share a prefix)."""

    impressions: str
    actions: str
    examples: str
    params: str
    dlq: str
    late: str
    items: str  # item-side features, one message per item id (compacted): streams.item_features

    def all(self) -> list[str]:
        return [getattr(self, short) for short in _SHORT_NAMES]


_SHORT_NAMES = ("impressions", "actions", "examples", "params", "dlq", "late", "items")

# Topic configs set at creation (others get the broker's defaults). hw.items is compacted and
# never expires by time or size: it is the catalog of every item's current features, and a
# serving replica rebuilds its catalog by reading it from the beginning.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    "items": {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"},
}


def topic_names(prefix: str = "hw") -> Topics:
    """``<prefix>.impressions`` etc.; a fresh prefix gives a fresh, isolated set of topics."""
    return Topics(*(f"{prefix}.{t}" for t in _SHORT_NAMES))


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
    retries: int = field(default=2_147_483_647, metadata={
        "help": "producer retries on transient errors (bounded in time by delivery_timeout_ms)"})
    delivery_timeout_ms: int = field(default=120_000, metadata={
        "help": "a send not acknowledged within this (retries included) fails loudly"})
    buffer_memory: int = field(default=64 << 20, metadata={
        "help": "unacknowledged bytes a producer holds (e.g. while the broker is away)"})
    max_block_ms: int = field(default=60_000, metadata={
        "help": "send() blocks this long on a full buffer, then fails loudly"})
    idempotence: bool = field(default=False, metadata={
        "help": "idempotent producer. Off by default: against Tansu 0.6.0 on s3:// storage an "
                "idempotent retry that straddles a broker crash can be answered as a duplicate "
                "while the batch itself was lost (acknowledged, then missing); without it a "
                "retry may duplicate a batch instead, and every consumer de-duplicates by id"})
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
    Topics with an entry in :data:`TOPIC_CONFIGS` (``items``: compacted) are created with it.
    """
    topics = topic_names(prefix if prefix is not None else cfg.topic_prefix)
    counts = partitions if isinstance(partitions, dict) else {}
    default = partitions if isinstance(partitions, int) else 1
    admin = admin_client(cfg)
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, counts.get(short, default), 1, topic_configs=TOPIC_CONFIGS.get(short, {}))
               for short, name in zip(_SHORT_NAMES, topics.all()) if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return topics


class MessageTooLargeError(ValueError):
    """A message over ``max_message_bytes``, refused before it was sent (nothing was queued)."""


class ProducerBoundError(KafkaError):
    """A send could not be delivered within the producer's bound: the buffer stayed full past
    ``max_block_ms`` or the broker did not acknowledge within ``delivery_timeout_ms``."""


class BatchProducer:
    """A KafkaProducer tuned for throughput, whose :meth:`flush` proves every send landed.

    Broker outages are bridged inside a bound: sends buffer (at most ``buffer_memory`` bytes not
    yet acknowledged; kafka-python 3 has no such limit of its own, so this wrapper keeps it) and
    retry until ``delivery_timeout_ms``; ``send`` blocks at most ``max_block_ms`` on a full
    buffer. Past the
    bound nothing is dropped silently: the failure is raised by the next :meth:`send` or
    :meth:`flush` (a producer that never flushes, like the generator, still learns of it), and
    counted in ``hw_stream_produce_errors_total``. A message over ``max_message_bytes`` is
    refused up front with :class:`MessageTooLargeError` naming its topic and size.
    """

    _PRUNE_EVERY = 10_000  # pending futures kept between flushes before done ones are dropped

    def __init__(self, cfg: KafkaConfig, client_id: str = "hw-producer") -> None:
        compression = None if cfg.compression in ("", "none") else cfg.compression
        self.max_message_bytes = cfg.max_message_bytes
        self.cfg = cfg
        self._producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=client_id, acks="all",
            compression_type=compression, linger_ms=cfg.linger_ms, batch_size=cfg.batch_bytes,
            # Headroom for record framing: our own size check below is the one that refuses.
            max_request_size=cfg.max_message_bytes + 4096, retries=cfg.retries,
            delivery_timeout_ms=cfg.delivery_timeout_ms, max_block_ms=cfg.max_block_ms,
            # kafka-python requires delivery >= linger + request timeout.
            request_timeout_ms=min(30_000, max(1, cfg.delivery_timeout_ms - cfg.linger_ms)),
            enable_idempotence=cfg.idempotence,
            # Back within a second of the broker's return (kafka-python backs off up to 30 s).
            reconnect_backoff_max_ms=1000,
            # Retries must not reorder a partition's messages.
            max_in_flight_requests_per_connection=1)
        self._pending: list = []
        self._error: BaseException | None = None
        self._unacked_bytes = 0
        self._acked = threading.Condition()
        self.sent = 0

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             partition: int | None = None) -> None:
        """Queues one message; raises at once if it is too large or an earlier send failed."""
        size = len(value) + (len(key) if key else 0)
        if size > self.max_message_bytes:
            PRODUCE_ERRORS.labels(topic, "too_large").inc()
            raise MessageTooLargeError(
                f"message for topic {topic} is {size} bytes, over the {self.max_message_bytes}-byte "
                f"limit (max_message_bytes, the broker's message.max.bytes); split it")
        self._raise_failed()
        with self._acked:
            room = self._acked.wait_for(
                lambda: self._unacked_bytes == 0 or
                self._unacked_bytes + size <= self.cfg.buffer_memory, self.cfg.max_block_ms / 1000)
            if not room:
                PRODUCE_ERRORS.labels(topic, "buffer_full").inc()
                raise ProducerBoundError(
                    f"send to {topic} blocked {self.cfg.max_block_ms} ms: {self._unacked_bytes} "
                    f"bytes unacknowledged, buffer_memory={self.cfg.buffer_memory} "
                    f"(broker unreachable?)")
            self._unacked_bytes += size
        try:
            fut = self._producer.send(topic, value=value, key=key, partition=partition)
        except KafkaTimeoutError as exc:  # no metadata for the topic within max_block_ms
            self._release(size)
            PRODUCE_ERRORS.labels(topic, "metadata_timeout").inc()
            raise ProducerBoundError(f"send to {topic} found no broker within "
                                     f"max_block_ms={self.cfg.max_block_ms}: {exc}") from exc
        fut.add_callback(self._on_success, size)
        fut.add_errback(self._on_failure, topic, size)
        self._pending.append(fut)
        self.sent += 1
        if len(self._pending) >= self._PRUNE_EVERY:
            self._pending = [f for f in self._pending if not f.is_done]

    def _release(self, size: int) -> None:
        with self._acked:
            self._unacked_bytes -= size
            self._acked.notify_all()

    def _on_success(self, size: int, _metadata: object) -> None:
        self._release(size)

    def _on_failure(self, topic: str, size: int, exc: BaseException) -> None:
        self._release(size)
        PRODUCE_ERRORS.labels(topic, type(exc).__name__).inc()
        log.error("send to %s not delivered within the producer bound: %s", topic, exc)
        if self._error is None:
            self._error = ProducerBoundError(
                f"a send to {topic} was not acknowledged within delivery_timeout_ms="
                f"{self.cfg.delivery_timeout_ms}: {exc!r}")

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self, timeout_s: float | None = 60.0) -> None:
        """Blocks until every message sent so far is acknowledged; raises the first failure."""
        self._producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        self._raise_failed()
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


def log_end(consumer: KafkaConsumer, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """The next offset a producer would get, per partition of ``topic``.

    Tansu answers ListOffsets(latest) with the base offset of the partition's last record batch
    plus one, which is short of the end when that batch holds several records. A fetch's high
    watermark is right, so the end is read by fetching the last batch. ``consumer`` must have no
    group (it is re-assigned here).
    """
    parts = consumer.partitions_for_topic(topic) or set()
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
