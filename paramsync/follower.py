"""Reading ``hw.params`` as a replica does: find the newest snapshot, then follow from there.

:func:`bootstrap_offset` finds where a new replica must start without replaying the topic (the
last message's ``snapshot_offset``, see :mod:`paramsync.wire`); :class:`ParamsFollower` tails the
topic from an offset and decodes each message; :class:`paramsync.replica.ReplicaState` applies
them.

Each reads one partition: 0 on an unsharded topic; on a sharded one a PS shard reads its own and a
recommender the control partition (:func:`paramsync.wire.control_partition`). Every partition is
self-contained, so the same bootstrap works on any of them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from paramsync.wire import ParamsMessage, ParamsWireError, decode_params

log = logging.getLogger(__name__)

__all__ = ["bootstrap_offset", "ParamsFollower"]

PARTITION = 0


def _consumer(bootstrap_servers: str, topic: str, partition: int = PARTITION) -> tuple[Any, Any]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                             enable_auto_commit=False, max_partition_fetch_bytes=16 << 20,
                             fetch_max_wait_ms=50)
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    return consumer, tp


def _end(consumer: Any, tp: Any) -> int:
    """``tp``'s end offset as a fetch sees it (Tansu's ListOffsets is short: see ``log_end``)."""
    from streams.kafka_consumer import log_end

    return log_end(consumer, tp.topic, partitions=[tp.partition])[tp.partition]


def bootstrap_offset(bootstrap_servers: str, topic: str, timeout_s: float = 10.0,
                     partition: int = PARTITION) -> int:
    """Offset a new replica starts reading at: the newest complete snapshot's begin marker.

    Reads one message (the last); returns 0 when the topic holds no complete snapshot yet.
    """
    consumer, tp = _consumer(bootstrap_servers, topic, partition)
    try:
        end = _end(consumer, tp)
        if end == 0:
            return 0
        consumer.assign([tp])
        consumer.seek(tp, end - 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=200, max_records=1).values():
                msg = decode_params(msgs[0].value)
                return max(msg.snapshot_offset, 0)
        raise TimeoutError(f"could not read the last message of {topic}")
    finally:
        consumer.close()


class ParamsFollower:
    """Yields ``(offset, ParamsMessage)`` from one ``hw.params`` partition, starting at ``offset``."""

    def __init__(self, bootstrap_servers: str, topic: str, offset: int = 0,
                 partition: int = PARTITION) -> None:
        self.consumer, self.tp = _consumer(bootstrap_servers, topic, partition)
        self.consumer.seek(self.tp, offset)
        self.bad = 0

    def end_offset(self) -> int:
        """The partition's end; the follower's position is kept."""
        at = self.consumer.position(self.tp)
        end = _end(self.consumer, self.tp)
        self.consumer.assign([self.tp])
        self.consumer.seek(self.tp, at)
        return end

    def poll(self, timeout_ms: int = 200) -> Iterator[tuple[int, ParamsMessage]]:
        for msgs in self.consumer.poll(timeout_ms=timeout_ms).values():
            for m in msgs:
                try:
                    yield m.offset, decode_params(m.value)
                except ParamsWireError as exc:
                    self.bad += 1
                    log.warning("skipping bad hw.params message at %d: %s", m.offset, exc)

    def close(self) -> None:
        self.consumer.close()
