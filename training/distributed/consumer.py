"""Each rank's share of ``hw.examples``: partitions ``p`` with ``p % world_size == rank``.

The ranks of one trainer are one consumer group for offsets (commits go to ``group_id``, so
tools see the group's lag as for one trainer), but partitions are *assigned* by rank rather than
balanced by the group coordinator. Ranks start at different moments; with dynamic balancing the
first rank would take every partition, train part of them, and hand them over in a rebalance
before any offset was committed, so the next owner would train the same examples again (de-dup
is per rank). The world is fixed for a run anyway: ``torchrun`` restarts every rank when one
fails, and a restart with another number of ranks re-shards from the checkpoint, whose manifest
holds every partition's offset.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, TopicPartition

from streams.kafka_consumer import GroupConsumer
from streams.kafka_io import KafkaConfig

log = logging.getLogger(__name__)

__all__ = ["RankConsumer", "rank_partitions"]


def rank_partitions(partitions: list[int], rank: int, world_size: int) -> list[int]:
    """The partitions rank ``rank`` reads (round-robin by partition number)."""
    return sorted(p for p in partitions if p % world_size == rank)


class RankConsumer(GroupConsumer):
    """A :class:`GroupConsumer` whose partitions are fixed by rank (poll/commit/close as usual)."""

    def __init__(self, cfg: KafkaConfig, topic: str, group_id: str, rank: int, world_size: int,
                 client_id: str = "hw-trainer", metadata_timeout_s: float = 60.0,
                 fetch_max_wait_ms: int = 500) -> None:
        self._consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers, group_id=group_id,
            client_id=f"{client_id}-{rank}", enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_interval_ms=cfg.max_poll_interval_ms,
            session_timeout_ms=cfg.session_timeout_ms,
            heartbeat_interval_ms=min(1000, cfg.session_timeout_ms // 3),
            fetch_max_bytes=max(52428800, cfg.max_message_bytes),
            max_partition_fetch_bytes=cfg.max_message_bytes, fetch_max_wait_ms=fetch_max_wait_ms)
        deadline = time.monotonic() + metadata_timeout_s
        parts = self._consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = self._consumer.partitions_for_topic(topic)
        if not parts:
            self._consumer.close(autocommit=False)
            raise RuntimeError(f"topic {topic} not found within {metadata_timeout_s:.0f} s")
        self.partitions = sorted(parts)
        mine = rank_partitions(self.partitions, rank, world_size)
        self._consumer.assign([TopicPartition(topic, p) for p in mine])
        log.info("rank %d/%d reads %s partitions %s of %d", rank, world_size, topic, mine,
                 len(self.partitions))
