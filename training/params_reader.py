"""Reading ``hw.params`` as a replica does: find the newest snapshot, load it, then follow deltas.

:func:`bootstrap_offset` finds where a new replica must start without replaying the topic (the
last message's ``snapshot_offset``, see :mod:`training.params_wire`); :class:`ParamsFollower`
tails the topic from an offset; :class:`ReplicaState` is a small in-memory replica (rows per slot
plus the tower bytes) that applies messages with the documented semantics. Serving keeps its own
tables, but uses the same two functions and semantics; tests use :class:`ReplicaState` to prove
that snapshot + deltas reproduce the trainer's table exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from training.params_wire import (DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END, SPARSE, ParamsMessage,
                                  ParamsWireError, decode_params, join_payload)

log = logging.getLogger(__name__)

__all__ = ["bootstrap_offset", "ParamsFollower", "ReplicaState"]

PARTITION = 0


def _consumer(bootstrap_servers: str, topic: str) -> tuple[Any, Any]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                             enable_auto_commit=False, max_partition_fetch_bytes=16 << 20,
                             fetch_max_wait_ms=50)
    tp = TopicPartition(topic, PARTITION)
    consumer.assign([tp])
    return consumer, tp


def bootstrap_offset(bootstrap_servers: str, topic: str, timeout_s: float = 10.0) -> int:
    """Offset a new replica starts reading at: the newest complete snapshot's begin marker.

    Reads one message (the last); returns 0 when the topic holds no complete snapshot yet.
    """
    consumer, tp = _consumer(bootstrap_servers, topic)
    try:
        end = consumer.end_offsets([tp])[tp]
        if end == 0:
            return 0
        consumer.seek(tp, end - 1)
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=200, max_records=1).values():
                msg = decode_params(msgs[0].value)
                return max(msg.snapshot_offset, 0)
        raise TimeoutError(f"could not read the last message of {topic}")
    finally:
        consumer.close()


class ParamsFollower:
    """Yields ``(offset, ParamsMessage)`` from ``hw.params`` partition 0, starting at ``offset``."""

    def __init__(self, bootstrap_servers: str, topic: str, offset: int = 0) -> None:
        self.consumer, self.tp = _consumer(bootstrap_servers, topic)
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
    """An in-memory replica: sorted ids + rows per slot, the tower bytes, version and watermark."""

    model_id: str
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    tower: bytes = b""
    version: int = -1
    watermark_ms: int = -1
    snapshot_id: int = -1
    _loading: int = -1  # snapshot being loaded (its rows are staged until the end marker)
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
        if len(self._staged) + 2 != end.chunk_count:
            log.warning("snapshot %d incomplete (%d of %d messages); ignored", end.snapshot_id,
                        len(self._staged) + 2, end.chunk_count)
            self._loading = -1
            return
        self.ids, self.rows, self._dense_chunks = {}, {}, {}
        for m in self._staged:
            self._apply_live(m)
        self.snapshot_id, self._loading, self._staged = end.snapshot_id, -1, []
        self.version, self.watermark_ms = end.version, end.watermark_ms

    def _apply_live(self, msg: ParamsMessage) -> None:
        if msg.kind == SPARSE:
            self._upsert(msg.slot, msg.ids, msg.values_f32(), msg.deleted_ids)
        elif msg.kind == DENSE:
            chunks = self._dense_chunks.setdefault(msg.publish_id, [])
            chunks.append(msg)
            if len(chunks) == msg.chunk_count:
                self.tower = join_payload(chunks)
                del self._dense_chunks[msg.publish_id]
        self.version = max(self.version, msg.version)
        self.watermark_ms = max(self.watermark_ms, msg.watermark_ms)

    def _upsert(self, slot: str, ids: np.ndarray, values: np.ndarray, deleted: np.ndarray) -> None:
        old_ids = self.ids.get(slot, np.zeros(0, np.int64))
        old_rows = self.rows.get(slot, np.zeros((0, values.shape[1] if values.ndim == 2 else 0), np.float32))
        if len(deleted):
            keep = ~np.isin(old_ids, deleted)
            old_ids, old_rows = old_ids[keep], old_rows[keep]
        if len(ids):
            if len(old_rows) == 0:
                old_rows = np.zeros((0, values.shape[1]), np.float32)
            all_ids = np.concatenate([ids, old_ids])  # new first: unique keeps the first
            all_rows = np.concatenate([values, old_rows])
            uniq, first = np.unique(all_ids, return_index=True)
            old_ids, old_rows = uniq, all_rows[first]
        self.ids[slot], self.rows[slot] = old_ids, old_rows

    def row_count(self) -> int:
        return sum(len(v) for v in self.ids.values())
