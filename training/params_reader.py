"""Reading ``hw.params`` as a replica does: find the newest snapshot, load it, then follow deltas.

:func:`bootstrap_offset` finds where a new replica must start without replaying the topic (the
last message's ``snapshot_offset``, see :mod:`training.params_wire`); :class:`ParamsFollower`
tails the topic from an offset; :class:`ReplicaState` is a small in-memory replica (rows per slot
and tower) that applies messages with the documented semantics; serving can use it as is, and
the tests use it to prove that snapshot + deltas reproduce the trainer's table exactly.

Each reads one partition: 0 on an unsharded topic; on a sharded one a PS shard reads its own and a
recommender the control partition (:func:`training.params_wire.control_partition`). Every
partition is self-contained, so the same bootstrap works on any of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from training.params_wire import (DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END, SPARSE, ParamsMessage,
                                  ParamsWireError, decode_params, join_payload)

log = logging.getLogger(__name__)

__all__ = ["bootstrap_offset", "ParamsFollower", "ReplicaState"]

PARTITION = 0


def _consumer(bootstrap_servers: str, topic: str, partition: int = PARTITION) -> tuple[Any, Any]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                             enable_auto_commit=False, max_partition_fetch_bytes=16 << 20,
                             fetch_max_wait_ms=50)
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    return consumer, tp


def bootstrap_offset(bootstrap_servers: str, topic: str, timeout_s: float = 10.0,
                     partition: int = PARTITION) -> int:
    """Offset a new replica starts reading at: the newest complete snapshot's begin marker.

    Reads one message (the last); returns 0 when the topic holds no complete snapshot yet.
    """
    consumer, tp = _consumer(bootstrap_servers, topic, partition)
    try:
        end = consumer.end_offsets([tp])[tp]
        if end == 0:
            return 0
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
        return self.consumer.end_offsets([self.tp])[self.tp]

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


@dataclass
class ReplicaState:
    """A serving-side replica: an ``EmbeddingTable`` plus the :class:`DenseTower`, kept current.

    Sparse messages go to ``table.import_delta``; dense chunks are joined and loaded into a new
    tower. A snapshot is staged until its end marker, then *replaces* table and tower (the table
    is rebuilt from the slots and dim in the snapshot's model config). Until the first complete
    snapshot, live messages are ignored: a replica starts at :func:`bootstrap_offset`.
    """

    model_id: str
    table: Any = None
    tower: Any = None
    version: int = -1
    watermark_ms: int = -1
    snapshot_id: int = -1
    applied: int = 0
    _loading: int = -1  # snapshot being loaded (its messages are staged until the end marker)
    _staged: list[ParamsMessage] = field(default_factory=list)
    _dense_chunks: dict[int, list[ParamsMessage]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """True once a complete snapshot has been applied."""
        return self.snapshot_id >= 0

    def apply(self, msg: ParamsMessage) -> None:
        if msg.model_id != self.model_id:
            return
        if msg.kind == SNAPSHOT_BEGIN:
            self._loading, self._staged = msg.snapshot_id, []
        elif msg.in_snapshot:
            if msg.snapshot_id != self._loading:
                return  # a snapshot we joined in the middle of: wait for the next one
            if msg.kind == SNAPSHOT_END:
                self._finish_snapshot(msg)
            else:
                self._staged.append(msg)
        elif self.ready:
            self._apply_live(msg)

    def _finish_snapshot(self, end: ParamsMessage) -> None:
        from embedding_store import EmbeddingTable, SlotConfig

        from training.model import tower_from_safetensors

        staged, self._loading, self._staged = self._staged, -1, []
        if len(staged) + 2 != end.chunk_count:
            log.warning("snapshot %d incomplete (%d of %d messages); ignored", end.snapshot_id,
                        len(staged) + 2, end.chunk_count)
            return
        dense = [m for m in staged if m.kind == DENSE]
        tower, _ = tower_from_safetensors(join_payload(dense))
        cfg = tower.cfg
        table = EmbeddingTable([SlotConfig(name=s, dim=cfg.embedding_dim) for s in cfg.slots])
        for m in staged:
            if m.kind == SPARSE:
                table.import_delta(m.table_delta())
        self.table, self.tower, self._dense_chunks = table, tower, {}
        self.snapshot_id = end.snapshot_id
        self.version, self.watermark_ms = end.version, end.watermark_ms
        self.applied += len(staged) + 2

    def _apply_live(self, msg: ParamsMessage) -> None:
        from training.model import tower_from_safetensors

        if msg.kind == SPARSE:
            self.table.import_delta(msg.table_delta())
        elif msg.kind == DENSE:
            chunks = self._dense_chunks.setdefault(msg.publish_id, [])
            chunks.append(msg)
            if len(chunks) == msg.chunk_count:
                self.tower, _ = tower_from_safetensors(join_payload(chunks))
                del self._dense_chunks[msg.publish_id]
        self.version = max(self.version, msg.version)
        self.watermark_ms = max(self.watermark_ms, msg.watermark_ms)
        self.applied += 1
