"""What a joiner hands the next owner of its input partitions: how far it had resolved them.

A joiner commits per partition the oldest record still pending (:mod:`streams.join_positions`),
so a new owner re-reads actions the old one had already resolved: joined into a request that
closed (its impression is not re-read) or sent to ``hw.late``. Such an action finds no pending
request, is parked, and would go to ``hw.late`` (``no_impression``) again. Tansu drops
offset-commit metadata, so the commit cannot say how far the old owner had read; this does.

Per owned partition a joiner writes a :class:`Resolved` to ``<prefix>.join_positions``, keyed by
(group, topic, partition): its read end, and the watermark by which every parked action had
left its state with durable output. It writes after a step's output is flushed and before its
offsets are committed (at most once per ``every_s``), and exactly when partitions leave it (a
rebalance's revocation, or close, both between steps). A record states facts about flushed
output, so a stale or lost one only claims less. On every rebuild a joiner reads the topic to
its end; a re-read action the record covers that no pending request claims when its parking
expires is dropped and counted (``replayed_resolved``). A missing, unreadable or malformed
record (the newest per key wins; a malformed one stands for none) degrades to today's
at-least-once late records; nothing no owner resolved is ever dropped. A joiner writes only a
record that claims at least what the inherited one did. The topic is created with
``cleanup.policy=compact``; Tansu's memory and S3 storage do not compact, so it grows by at
most one record per partition a second while input flows, and a rebuild reads it all.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.kafka_consumer import log_end
from streams.kafka_io import KafkaConfig, admin_client
from streams.kafka_producer import BatchProducer

log = logging.getLogger(__name__)

Partition = tuple[str, int]
TOPIC_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"}


@dataclass(frozen=True)
class Resolved:
    """Every action an owner read from a partition below ``read_end`` whose parking expiry
    (event time + window) is at or before ``watermark`` left its state with durable output."""

    read_end: int
    watermark: int

    def covers(self, offset: int, expire_ms: int) -> bool:
        return offset < self.read_end and expire_ms <= self.watermark

    def claims_at_least(self, other: Resolved | None) -> bool:
        return other is None or (self.read_end >= other.read_end
                                 and self.watermark >= other.watermark)


def record_key(group: str, partition: Partition) -> bytes:
    return json.dumps([group, partition[0], partition[1]]).encode()


def encode_resolved(group: str, partition: Partition, r: Resolved) -> bytes:
    return json.dumps({"v": 1, "group": group, "topic": partition[0], "partition": partition[1],
                       "read_end": r.read_end, "watermark": r.watermark}).encode()


def decode_resolved(value: bytes) -> tuple[str, Partition, Resolved]:
    """Raises ``ValueError`` on anything but a version-1 record with sane fields."""
    try:
        obj = json.loads(value)
        group, topic, part = obj["group"], obj["topic"], obj["partition"]
        end, mark = obj["read_end"], obj["watermark"]
    except (TypeError, KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"undecodable join position: {exc}") from exc
    ints = (part, end, mark)
    if (obj.get("v") != 1 or not isinstance(group, str) or not isinstance(topic, str)
            or not all(type(x) is int and x >= 0 for x in ints)):
        raise ValueError(f"invalid join position {obj!r}")
    return group, (topic, part), Resolved(end, mark)


class HandOff:
    """One joiner's side of the hand-off: the records it inherited, and the ones it writes."""

    every_s = 1.0  # a partition's record is rewritten at most this often (see the docstring)

    def __init__(self, kafka: KafkaConfig, topic: str, group: str, producer: BatchProducer) -> None:
        self.kafka, self.topic, self.group, self.producer = kafka, topic, group, producer
        self.inherited: dict[Partition, Resolved] = {}
        self._written: dict[Partition, Resolved] = {}
        self._last_write = float("-inf")

    def ensure_topic(self) -> None:
        """Creates the compacted topic if missing; a failure only leaves the hand-off off."""
        try:
            admin = admin_client(self.kafka)
            try:
                if self.topic not in set(admin.list_topics()):
                    admin.create_topics([NewTopic(self.topic, 1, 1, topic_configs=TOPIC_CONFIG)])
            finally:
                admin.close()
        except TopicAlreadyExistsError:
            pass
        except Exception as exc:  # the joiner runs on without it
            log.warning("cannot create %s (%s): replays may repeat late records", self.topic, exc)

    def load(self, partitions, timeout_s: float = 10.0) -> dict[Partition, Resolved]:
        """The newest record of each of ``partitions`` (read to the topic's end); empty when it
        cannot be read. What is inherited is also what a later write must claim at least."""
        wanted = set(partitions)
        try:
            newest = self._read(timeout_s)
        except Exception as exc:  # unreadable: degrade, never stop the rebuild
            log.warning("join positions unreadable (%s): late records may repeat", exc)
            newest = {}
        self.inherited = {tp: r for tp, r in newest.items() if tp in wanted}
        self._written = dict(self.inherited)
        log.info("join positions inherited for %d of %d partitions", len(self.inherited),
                 len(wanted))
        return self.inherited

    def _read(self, timeout_s: float) -> dict[Partition, Resolved]:
        consumer = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap_servers, group_id=None,
                                 enable_auto_commit=False, max_partition_fetch_bytes=1 << 20)
        try:
            ends = log_end(consumer, self.topic, timeout_s)
            tps = [TopicPartition(self.topic, p) for p, end in ends.items() if end > 0]
            if not tps:
                return {}
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            values: dict[bytes, bytes] = {}
            deadline = time.monotonic() + timeout_s
            while any(consumer.position(tp) < ends[tp.partition] for tp in tps):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.topic} not read to its end in {timeout_s} s")
                for msgs in consumer.poll(timeout_ms=200, max_records=10000).values():
                    values.update((m.key, m.value) for m in msgs if m.key is not None)
        finally:
            consumer.close()
        out: dict[Partition, Resolved] = {}
        for key, value in values.items():  # the newest per key; a malformed one stands for none
            try:
                group, tp, r = decode_resolved(value)
                if record_key(group, tp) != key:
                    raise ValueError("key and record disagree")
            except ValueError as exc:
                log.warning("ignoring a join position record with key %r: %s", key, exc)
                continue
            if group == self.group:
                out[tp] = r
        return out

    def covers(self, partition: Partition, offset: int, expire_ms: int) -> bool:
        """Whether an action re-read from ``partition`` at ``offset`` had been resolved."""
        r = self.inherited.get(partition)
        return r is not None and r.covers(offset, expire_ms)

    def publish(self, read_ends: dict[Partition, int], watermark: int, force: bool = False) -> None:
        """Sends a record for each partition whose claim grew (all output so far is flushed)."""
        now = time.monotonic()
        if not force and now - self._last_write < self.every_s:
            return
        self._last_write = now
        for tp, end in read_ends.items():
            r, before = Resolved(end, watermark), self._written.get(tp)
            if r != before and r.claims_at_least(before):
                self.producer.send(self.topic, encode_resolved(self.group, tp, r),
                                   key=record_key(self.group, tp))
                self._written[tp] = r

    def hand_over(self, read_ends: dict[Partition, int], watermark: int) -> None:
        """The exact record as partitions leave (revoked, or close), flushed; a failure only
        costs repeated late records."""
        try:
            self.publish(read_ends, watermark, force=True)
            self.producer.flush()
        except Exception:
            log.exception("join positions not handed over")
