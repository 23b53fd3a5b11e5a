"""Ships parameters to serving over ``hw.params``: row deltas each second, the tower each minute,
full snapshots at start and periodically (see :mod:`training.params_wire` for the format).

The publisher runs on the trainer's thread between steps, so a delta is always a consistent cut:
rows changed in table versions ``(last_published, table.version]``. The version only advances once
the broker acknowledged every chunk, so a failed publish is simply retried by the next one (a
replica applying a row twice is harmless: rows are values, not increments).

Everything goes to partition 0 of the topic, so replicas see one total order and can find the
newest snapshot from the last message's ``snapshot_offset``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import Counter, Gauge

from embedding_store import SlotDelta, TableDelta, encode_delta

from training.params_wire import (DENSE, HEADER_BYTES, SNAPSHOT_BEGIN, SNAPSHOT_END, SPARSE,
                                  ParamsMessage, encode_params, payload_chunks)

log = logging.getLogger(__name__)

__all__ = ["SyncConfig", "DeltaPublisher"]

PUBLISHED_ROWS = Counter("hw_train_published_rows", "embedding rows published to hw.params", ["kind"])
PUBLISHED_BYTES = Counter("hw_train_published_bytes", "bytes published to hw.params", ["kind"])
PUBLISHED_VERSION = Gauge("hw_train_published_version", "table version of the last sparse publish")
PUBLISHED_WATERMARK = Gauge("hw_train_published_watermark_ms", "event-time watermark of the last publish")
PARTITION = 0


@dataclass
class SyncConfig:
    """Publishing cadence and encoding (a view of the trainer config)."""

    model_id: str = "ctr"
    sparse_interval_s: float = 1.0
    dense_interval_s: float = 60.0
    snapshot_interval_s: float = 600.0
    fp16: bool = False
    max_message_bytes: int = 1 << 20


class DeltaPublisher:
    """Publishes changed rows, dense weights and snapshots of one table + tower to ``hw.params``.

    ``tower_bytes`` returns the current dense weights as safetensors bytes (it is called only
    when a dense publish is due). ``producer`` is a kafka-python ``KafkaProducer``.
    """

    def __init__(self, producer: Any, topic: str, table: Any, tower_bytes: Callable[[], bytes],
                 cfg: SyncConfig) -> None:
        self.producer = producer
        self.topic = topic
        self.table = table
        self.tower_bytes = tower_bytes
        self.cfg = cfg
        self.published_version = -1  # nothing published yet: the first publish is a snapshot
        self.snapshot_offset = -1
        self._publish_id = int(time.time() * 1000) << 8  # distinct across restarts
        self._last_sparse = self._last_dense = self._last_snapshot = float("-inf")
        self.dense_requested = False

    def _next_id(self) -> int:
        self._publish_id += 1
        return self._publish_id

    def _header(self, kind: str, watermark_ms: int, **kw: Any) -> ParamsMessage:
        return ParamsMessage(kind=kind, model_id=self.cfg.model_id, version=int(self.table.version),
                             watermark_ms=int(watermark_ms), snapshot_offset=self.snapshot_offset,
                             **kw)

    def _send(self, messages: list[ParamsMessage], kind: str) -> list[Any]:
        futures = []
        for m in messages:
            data = encode_params(m)
            futures.append(self.producer.send(self.topic, value=data,
                                              key=self.cfg.model_id.encode(), partition=PARTITION))
            PUBLISHED_BYTES.labels(kind=kind).inc(len(data))
            if m.chunk_index == 0:
                PUBLISHED_ROWS.labels(kind=kind).inc(m.rows)
        return futures

    def _sync(self, futures: list[Any], timeout_s: float = 30.0) -> list[Any]:
        self.producer.flush(timeout=timeout_s)
        return [f.get(timeout=timeout_s) for f in futures]  # raises the send's error, if any

    # -- what is due ---------------------------------------------------------------------
    def maybe_publish(self, watermark_ms: int, now: float | None = None) -> bool:
        """Publishes whatever is due; returns True if anything was sent."""
        now = time.monotonic() if now is None else now
        if self.published_version < 0 or now - self._last_snapshot >= self.cfg.snapshot_interval_s:
            self.publish_snapshot(watermark_ms)
            self._last_snapshot = self._last_sparse = self._last_dense = now
            return True
        sent = False
        if now - self._last_sparse >= self.cfg.sparse_interval_s:
            self._last_sparse = now
            sent |= self.publish_sparse(watermark_ms)
        if self.dense_requested or now - self._last_dense >= self.cfg.dense_interval_s:
            self._last_dense = now
            self.dense_requested = False
            self.publish_dense(watermark_ms)
            sent = True
        return sent

    def request_dense(self) -> None:
        """Asks for a dense publish at the next :meth:`maybe_publish` (the 'on demand' path)."""
        self.dense_requested = True

    # -- the three kinds --------------------------------------------------------------------
    def publish_sparse(self, watermark_ms: int) -> bool:
        """Rows changed since the last publish; nothing is sent when nothing changed."""
        version = int(self.table.version)
        if version == self.published_version:
            return False
        delta = self.table.export_delta(since_version=self.published_version)
        msgs = self._row_messages(delta, watermark_ms, -1)
        self._sync(self._send(msgs, "sparse"))
        self.published_version = version
        # Every replica now has these deletions (or will load a later snapshot without them).
        self.table.compact_deletions(version)
        PUBLISHED_VERSION.set(version)
        PUBLISHED_WATERMARK.set(watermark_ms)
        return True

    def publish_dense(self, watermark_ms: int, snapshot_id: int = -1) -> None:
        base = self._header(DENSE, watermark_ms, publish_id=self._next_id(), snapshot_id=snapshot_id)
        msgs = payload_chunks(base, self.tower_bytes(), self.cfg.max_message_bytes)
        self._sync(self._send(msgs, "dense"))
        PUBLISHED_WATERMARK.set(watermark_ms)

    def publish_snapshot(self, watermark_ms: int) -> int:
        """A complete, authoritative state between begin/end markers; returns the begin offset."""
        version = int(self.table.version)
        sid = self._next_id()
        begin = self._header(SNAPSHOT_BEGIN, watermark_ms, publish_id=sid, snapshot_id=sid)
        (meta,) = self._sync(self._send([begin], "snapshot"))
        begin_offset = int(meta.offset)
        delta = self.table.export_delta(since_version=0)
        for name, sd in delta.slots.items():  # a snapshot is the full state: no deletions
            delta.slots[name] = SlotDelta(ids=sd.ids, values=sd.values)
        msgs = self._row_messages(delta, watermark_ms, sid)
        dense = payload_chunks(self._header(DENSE, watermark_ms, publish_id=self._next_id(),
                                            snapshot_id=sid),
                               self.tower_bytes(), self.cfg.max_message_bytes)
        body = msgs + dense
        end = self._header(SNAPSHOT_END, watermark_ms, publish_id=sid, snapshot_id=sid,
                           chunk_count=len(body) + 2)
        end.snapshot_offset = begin_offset
        self._sync(self._send(body, "snapshot") + self._send([end], "snapshot"))
        self.snapshot_offset = begin_offset
        self.published_version = version
        PUBLISHED_VERSION.set(version)
        log.info("snapshot %d at offset %d: version %d, %d messages", sid, begin_offset, version,
                 len(body) + 2)
        return begin_offset

    def _row_messages(self, delta: TableDelta, watermark_ms: int, snapshot_id: int) -> list[ParamsMessage]:
        """One publish per non-empty slot, each chunked by ``encode_delta`` under the size limit."""
        msgs: list[ParamsMessage] = []
        for slot in sorted(delta.slots):
            sd = delta.slots[slot]
            if sd.ids.size == 0 and sd.deleted_ids.size == 0:
                continue
            one = TableDelta(from_version=max(delta.from_version, 0), to_version=delta.to_version,
                             slots={slot: sd})
            chunks = encode_delta(one, fp16=self.cfg.fp16,
                                  max_bytes=self.cfg.max_message_bytes - HEADER_BYTES)
            pid = self._next_id()
            msgs += [self._header(SPARSE, watermark_ms, publish_id=pid, slot=slot,
                                  from_version=one.from_version, snapshot_id=snapshot_id,
                                  chunk_index=i, chunk_count=len(chunks), rows=int(sd.ids.size),
                                  payload=c)
                     for i, c in enumerate(chunks)]
        return msgs
