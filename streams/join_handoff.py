"""What a joiner hands the next owner of its input partitions: how far it had resolved them.

A joiner commits per partition the oldest record still pending (:mod:`streams.join_positions`),
so a new owner re-reads actions the old one had already resolved: joined into a request that
closed (its impression is not re-read) or sent to ``hw.late``. Such an action finds no pending
request, is parked, and would go to ``hw.late`` (``no_impression``) again. Tansu drops
offset-commit metadata, so the commit cannot say how far the old owner had read; this does.

Per owned partition a joiner writes a :class:`Resolved` to ``<prefix>.join_positions``, keyed by
(group, topic, partition): its read end and the offsets of the actions still parked (waiting for
an impression that has not come). Every other action it read left its state with durable output
(joined into an example that was sent, or sent late) or waits beside a pending request, whose
impression the next owner reads again, so that it claims the action again. Past ``PARKED_LIMIT``
parked actions (or in a record without the list) the record says less: the watermark by which
every parked action had left. It writes after a step's output is flushed and before its offsets
are committed (at most once per ``every_s``), and exactly when partitions leave it (a
rebalance's revocation, or close, both between steps). A record states facts about flushed
output, so a stale or lost one only claims less. On every rebuild a joiner reads the topic to
its end; a re-read action the record covers that no pending request claims when its parking
expires is dropped and counted (``replayed_resolved``). A missing, unreadable or malformed
record (the newest per key wins; a malformed one stands for none) degrades to today's
at-least-once late records; nothing no owner resolved is ever dropped. A joiner writes only a
record that claims at least what the inherited one did. The topic is created with
``cleanup.policy=compact``; Tansu's memory and S3 storage do not compact, so it grows by at most
one record per partition a second while input flows, and a rebuild reads it all.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.kafka_io import KafkaConfig, admin_client
from streams.kafka_producer import BatchProducer

log = logging.getLogger(__name__)

Partition = tuple[str, int]
TOPIC_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"}
PARKED_LIMIT = 20_000  # parked actions listed in one joiner's records (~8 bytes each)


@dataclass(frozen=True)
class Resolved:
    """Every action an owner read from a partition below ``read_end`` was resolved, except the
    ``parked`` offsets; where the list is unknown (None), those whose parking expiry (event
    time + window) is after ``watermark``."""

    read_end: int
    watermark: int
    parked: frozenset[int] | None = None

    def covers(self, offset: int, expire_ms: int) -> bool:
        if offset >= self.read_end:
            return False
        return offset not in self.parked if self.parked is not None else expire_ms <= self.watermark

    def claims_at_least(self, other: Resolved | None) -> bool:
        """For records without the list (a listed one is built to claim at least the last)."""
        return other is None or (other.parked is None and self.read_end >= other.read_end
                                 and self.watermark >= other.watermark)


def record_key(group: str, partition: Partition) -> bytes:
    return json.dumps([group, partition[0], partition[1]]).encode()


def encode_resolved(group: str, partition: Partition, r: Resolved) -> bytes:
    return json.dumps({"v": 1, "group": group, "topic": partition[0], "partition": partition[1],
                       "read_end": r.read_end, "watermark": r.watermark,
                       "parked": None if r.parked is None else sorted(r.parked)}).encode()


def decode_resolved(value: bytes) -> tuple[str, Partition, Resolved]:
    """Raises ``ValueError`` on anything but a version-1 record with sane fields."""
    try:
        obj = json.loads(value)
        group, topic, part = obj["group"], obj["topic"], obj["partition"]
        end, mark, parked = obj["read_end"], obj["watermark"], obj.get("parked")
    except (TypeError, KeyError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"undecodable join position: {exc}") from exc
    ints = (part, end, mark, *(parked if isinstance(parked, list) else ()))
    if (obj.get("v") != 1 or not isinstance(group, str) or not isinstance(topic, str)
            or not all(type(x) is int and x >= 0 for x in ints)
            or not (parked is None or isinstance(parked, list))):
        raise ValueError(f"invalid join position {obj!r}")
    return group, (topic, part), Resolved(end, mark, None if parked is None else frozenset(parked))


class HandOff:
    """One joiner's side of the hand-off: the records it inherited, and the ones it writes."""

    every_s = 1.0  # a partition's record is rewritten at most this often (see the docstring)

    def __init__(self, kafka: KafkaConfig, topic: str, group: str, producer: BatchProducer,
                 actions_topic: str = "") -> None:
        self.kafka, self.topic, self.group, self.producer = kafka, topic, group, producer
        self.actions_topic = actions_topic  # whose partitions the parked offsets are in
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
        """The topic from offset 0 up to the high watermark its fetches report: no ListOffsets
        request (a rebuild runs between polls, and Tansu on S3 storage answers ListOffsets in
        seconds on a long log; a fetch's high watermark is the true end,
        :func:`streams.kafka_consumer.log_end`)."""
        consumer = KafkaConsumer(bootstrap_servers=self.kafka.bootstrap_servers, group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 max_partition_fetch_bytes=1 << 20)
        try:
            tps = [TopicPartition(self.topic, p)
                   for p in sorted(consumer.partitions_for_topic(self.topic) or ())]
            if not tps:
                return {}
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)  # below a log start (deleted records): reset to it
            values: dict[bytes, bytes] = {}
            deadline = time.monotonic() + timeout_s
            while True:
                for msgs in consumer.poll(timeout_ms=200, max_records=10000).values():
                    values.update((m.key, m.value) for m in msgs if m.key is not None)
                marks = [consumer.highwater(tp) for tp in tps]
                if all(m is not None and consumer.position(tp) >= m for tp, m in zip(tps, marks)):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.topic} not read to its end in {timeout_s} s")
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

    def publish(self, read_ends: dict[Partition, int], watermark: int,
                parked: Callable[[int], dict[int, list[tuple[int, int]]] | None] | None = None,
                force: bool = False) -> None:
        """Sends a record for each partition whose claim changed (all output so far is flushed).
        ``parked(limit)``: ``{partition: [(offset, expire_ms)]}`` of the actions still parked,
        None past ``limit`` (:meth:`streams.join_state.JoinState.parked_sources`)."""
        now = time.monotonic()
        if not force and now - self._last_write < self.every_s:
            return
        self._last_write = now
        listed = parked(PARKED_LIMIT) if parked is not None else None
        for tp, end in read_ends.items():
            inherited, before = self.inherited.get(tp), self._written.get(tp)
            if inherited is not None and end < inherited.read_end:
                continue  # still re-reading what the last owner had read: its record stands
            if listed is None:
                r = Resolved(end, watermark)
                if not r.claims_at_least(before):
                    continue
            else:  # what the last owner had resolved stays resolved while this one re-parks it
                waiting = listed.get(tp[1], ()) if tp[0] == self.actions_topic else ()
                kept = (o for o, expire in waiting
                        if inherited is None or not inherited.covers(o, expire))
                r = Resolved(end, watermark, frozenset(kept))
            if r != before:
                self.producer.send(self.topic, encode_resolved(self.group, tp, r),
                                   key=record_key(self.group, tp))
                self._written[tp] = r

    def hand_over(self, read_ends: dict[Partition, int], watermark: int,
                  parked: Callable[[int], dict | None] | None = None) -> None:
        """The exact record as partitions leave (revoked, or close), flushed; a failure only
        costs repeated late records."""
        try:
            self.publish(read_ends, watermark, parked, force=True)
            self.producer.flush()
        except Exception:
            log.exception("join positions not handed over")
