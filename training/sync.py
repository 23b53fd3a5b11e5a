"""Ships parameters to serving over ``hw.params``: row deltas each second, the tower each minute,
full snapshots at start and periodically (the format and its message kinds: :mod:`paramsync.wire`).

The publisher runs on the trainer's thread between steps, so a delta is always a consistent cut:
rows changed in table versions ``(last_published, table.version]``. The version only advances once
the broker acknowledged every chunk, so a failed publish is simply retried by the next one (a
replica applying a row twice is harmless: rows are values, not increments).

Unsharded (``num_param_shards`` = 1), everything goes to partition 0 of the topic, so replicas
see one total order and can find the newest snapshot from the last message's ``snapshot_offset``.
Sharded (N > 1), each publish is split by :func:`embedding_store.sharding.shard_of`: shard ``i``'s
rows go to partition ``i`` and the tower to the control partition N, so a parameter-server shard
reads only its part; every partition still gets its own complete snapshots (layout:
:mod:`paramsync.wire`). Each partition is one total order on its own; partitions are not
ordered against each other, which is fine because a row lives in exactly one of them.

Versions name content: a replica's ``version`` says which rows *and* which tower it serves. A
dense publish first sends the rows not published yet, and a tower that differs from the last one
published takes a version of its own (the table's version is advanced by one, with no rows under
it), so a replica never shows one version number with two different towers.

Guarded publishing: given a :class:`training.publish_guard.PublishGuard`, every publish (delta,
tower, snapshot, the final one on stop) is checked first and sent only if it passes; a failing
one is held back (nothing sent, ``published_version`` unchanged, so the next passing publish
carries everything since). While the guard holds, checks repeat at the sparse cadence; the rule
for what follows (release, rollback) is in that module.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from prometheus_client import Counter, Gauge

from embedding_store import SlotDelta, TableDelta, encode_delta
from embedding_store.sharding import shard_of
from paramsync import (CONTROL_SHARD, DENSE, HEADER_BYTES, SNAPSHOT_BEGIN, SNAPSHOT_END, SPARSE,
                       ParamsMessage, control_partition, encode_params, params_partitions, payload_chunks)

from training.publish_guard import PublishGuard

log = logging.getLogger(__name__)

__all__ = ["SyncConfig", "DeltaPublisher"]

PUBLISHED_ROWS = Counter("hw_train_published_rows", "embedding rows published to hw.params", ["kind"])
PUBLISHED_BYTES = Counter("hw_train_published_bytes", "bytes published to hw.params", ["kind"])
PUBLISHED_VERSION = Gauge("hw_train_published_version", "table version of the last publish (rows and tower)")
PUBLISHED_WATERMARK = Gauge("hw_train_published_watermark_ms", "event-time watermark of the last publish")


@dataclass
class SyncConfig:
    """Publishing cadence and encoding (a view of the trainer config)."""

    model_id: str = "ctr"
    sparse_interval_s: float = 1.0
    dense_interval_s: float = 60.0
    snapshot_interval_s: float = 600.0
    fp16: bool = False
    max_message_bytes: int = 1 << 20
    num_param_shards: int = 1  # > 1: rows split by shard onto partitions 0..N-1, tower on N


class DeltaPublisher:
    """Publishes changed rows, dense weights and snapshots of one table + tower to ``hw.params``.

    ``tower_bytes`` returns the current dense weights as safetensors bytes (it is called only
    when a dense publish is due). ``producer`` is a kafka-python ``KafkaProducer``. ``guard``, if
    given, checks every publish first (see the module docstring).
    """

    def __init__(self, producer: Any, topic: str, table: Any, tower_bytes: Callable[[], bytes],
                 cfg: SyncConfig, guard: PublishGuard | None = None) -> None:
        self.producer = producer
        self.guard = guard
        self.topic = topic
        self.table = table
        self.tower_bytes = tower_bytes
        self.cfg = cfg
        self.published_version = -1  # nothing published yet: the first publish is a snapshot
        n = cfg.num_param_shards
        self.partitions = list(range(params_partitions(n)))
        self.control = control_partition(n)
        self.snapshot_offsets = {p: -1 for p in self.partitions}  # newest complete, per partition
        if n > 1:
            have = len(producer.partitions_for(topic))
            if have < len(self.partitions):
                raise ValueError(f"{topic} has {have} partitions; num_param_shards={n} needs "
                                 f"{len(self.partitions)} (see paramsync.ensure_params_partitions)")
        self._publish_id = int(time.time() * 1000) << 8  # distinct across restarts
        self._last_sparse = self._last_dense = self._last_snapshot = float("-inf")
        self._last_check = float("-inf")
        self.dense_requested = False
        self._tower_digest = b""  # of the tower bytes last published (dense or snapshot)

    def _next_id(self) -> int:
        self._publish_id += 1
        return self._publish_id

    @property
    def snapshot_offset(self) -> int:
        """Begin offset of the newest complete snapshot on the control partition (-1 before any)."""
        return self.snapshot_offsets[self.control]

    def _shard(self, partition: int) -> int:
        return CONTROL_SHARD if self.cfg.num_param_shards > 1 and partition == self.control else partition

    def _partition(self, msg: ParamsMessage) -> int:
        return self.control if msg.shard == CONTROL_SHARD else msg.shard

    def _header(self, kind: str, watermark_ms: int, partition: int, **kw: Any) -> ParamsMessage:
        return ParamsMessage(kind=kind, model_id=self.cfg.model_id, version=int(self.table.version),
                             watermark_ms=int(watermark_ms),
                             snapshot_offset=self.snapshot_offsets[partition],
                             shard=self._shard(partition), num_shards=self.cfg.num_param_shards, **kw)

    def _send(self, messages: list[ParamsMessage], kind: str) -> list[Any]:
        futures = []
        for m in messages:
            data = encode_params(m)
            futures.append(self.producer.send(self.topic, value=data, key=self.cfg.model_id.encode(),
                                              partition=self._partition(m)))
            PUBLISHED_BYTES.labels(kind=kind).inc(len(data))
            if m.chunk_index == 0:
                PUBLISHED_ROWS.labels(kind=kind).inc(m.rows)
        return futures

    def _sync(self, futures: list[Any], timeout_s: float = 30.0) -> list[Any]:
        self.producer.flush(timeout=timeout_s)
        return [f.get(timeout=timeout_s) for f in futures]  # raises the send's error, if any

    # -- the guard ---------------------------------------------------------------------------
    @property
    def holding(self) -> bool:
        """True while the guard holds every update back."""
        return self.guard is not None and self.guard.holding

    @property
    def rollback_due(self) -> bool:
        """The guard gave up waiting: the trainer should roll back (``training.publish_guard``)."""
        return self.guard is not None and self.guard.rollback_due

    def _vet(self, delta: TableDelta | None, what: str) -> bool:
        """The guard's verdict on publishing ``delta`` (None: no rows) with the current tower."""
        if self.guard is None:
            return True
        was_holding = self.guard.holding
        if delta is None and was_holding and int(self.table.version) != self.published_version:
            # What releases a hold must cover everything held: the rows too, not just the tower.
            delta = self.table.export_delta(since_version=max(self.published_version, 0))
        ok = self.guard.check(delta, self.table.slots, what).ok
        if ok and was_holding:
            self.dense_requested = True  # the tower may have moved while everything was held
        return ok

    def state_is_good(self) -> bool:
        """Whether the guard passes everything not published yet: what a checkpoint may capture."""
        if self.guard is None:
            return True
        return self._vet(self.table.export_delta(since_version=max(self.published_version, 0)), "checkpoint")

    def _snapshot_delta(self) -> TableDelta:
        delta = self.table.export_delta(since_version=0)
        for name, sd in delta.slots.items():  # a snapshot is the full state: no deletions
            delta.slots[name] = SlotDelta(ids=sd.ids, values=sd.values)
        return delta

    # -- what is due ---------------------------------------------------------------------
    def maybe_publish(self, watermark_ms: int, now: float | None = None) -> bool:
        """Publishes whatever is due (and passes the guard); returns True if anything was sent."""
        now = time.monotonic() if now is None else now
        snapshot = self.published_version < 0 or now - self._last_snapshot >= self.cfg.snapshot_interval_s
        sparse = now - self._last_sparse >= self.cfg.sparse_interval_s
        dense = self.dense_requested or now - self._last_dense >= self.cfg.dense_interval_s
        if not (snapshot or sparse or dense):
            return False
        rows = None
        # A tower goes out with every row trained before it (its version names both).
        sparse = sparse or (dense and int(self.table.version) != self.published_version)
        if self.guard is not None:
            if self.guard.holding and now - self._last_check < self.cfg.sparse_interval_s:
                return False  # held: check again at the sparse cadence, not every step
            self._last_check = now
            if snapshot:
                rows = self._snapshot_delta()
            elif sparse and int(self.table.version) != self.published_version:
                rows = self.table.export_delta(since_version=self.published_version)
            what = "snapshot" if snapshot else "+".join(k for k, due in (("sparse", sparse), ("dense", dense)) if due)
            if not self._vet(rows, what):
                return False
        if snapshot:
            self.publish_snapshot(watermark_ms, vetted=rows)
            self._last_snapshot = self._last_sparse = self._last_dense = now
            return True
        sent = False
        if sparse:
            self._last_sparse = now
            sent |= self.publish_sparse(watermark_ms, vetted=rows)
        if self.dense_requested or dense:
            self._last_dense = now
            self.dense_requested = False
            self.publish_dense(watermark_ms, vetted=True)
            sent = True
        return sent

    def request_dense(self) -> None:
        """Asks for a dense publish at the next :meth:`maybe_publish` (the 'on demand' path)."""
        self.dense_requested = True

    # -- the three kinds --------------------------------------------------------------------
    def publish_sparse(self, watermark_ms: int, vetted: TableDelta | None = None) -> bool:
        """Rows changed since the last publish; nothing is sent when nothing changed or the guard
        holds them back. ``vetted``: that delta, exported and checked by the caller just now."""
        delta = vetted
        if delta is None:
            if int(self.table.version) == self.published_version:
                return False
            delta = self.table.export_delta(since_version=self.published_version)
            if not self._vet(delta, "sparse"):
                return False
        version = int(delta.to_version)
        if version == self.published_version:
            return False
        msgs = self._row_messages(delta, watermark_ms, -1)
        msgs += self._heartbeats(msgs, delta, watermark_ms)
        self._sync(self._send(msgs, "sparse"))
        self.published_version = version
        # Every replica now has these deletions (or will load a later snapshot without them).
        self.table.compact_deletions(version)
        PUBLISHED_VERSION.set(version)
        PUBLISHED_WATERMARK.set(watermark_ms)
        return True

    def publish_dense(self, watermark_ms: int, snapshot_id: int = -1, vetted: bool = False) -> bool:
        """The tower, to the control partition (parameter shards only need it in snapshots),
        after the rows not published yet; a changed tower under a version of its own (module
        doc). Returns False when the guard held it back (``vetted``: the caller checked it just
        now, rows included)."""
        pending = self.published_version >= 0 and int(self.table.version) != self.published_version
        rows = self.table.export_delta(since_version=self.published_version) if pending and not vetted else None
        if not vetted and not self._vet(rows, "dense"):
            return False
        if pending and not self.publish_sparse(watermark_ms, vetted=rows) \
                and int(self.table.version) != self.published_version:
            return False  # the rows were held back: so is the tower that learned from them
        tower = self.tower_bytes()
        digest = hashlib.blake2b(tower, digest_size=16).digest()
        bump = self.published_version >= 0 and digest != self._tower_digest
        if bump:
            with self.table.lock:  # a version with no rows under it: this tower's
                self.table.version = int(self.table.version) + 1
        base = self._header(DENSE, watermark_ms, self.control, publish_id=self._next_id(),
                            snapshot_id=snapshot_id)
        msgs = payload_chunks(base, tower, self.cfg.max_message_bytes)
        if bump:  # shard partitions learn the version too (their rows did not change)
            empty = TableDelta(self.published_version, int(self.table.version), {})
            msgs += self._heartbeats(msgs, empty, watermark_ms)
        self._sync(self._send(msgs, "dense"))
        self._tower_digest = digest
        if bump:
            self.published_version = int(self.table.version)
            PUBLISHED_VERSION.set(self.published_version)
        PUBLISHED_WATERMARK.set(watermark_ms)
        return True

    def publish_snapshot(self, watermark_ms: int, vetted: TableDelta | None = None) -> int:
        """A complete, authoritative state between begin/end markers on every partition.

        Returns the begin offset on the control partition (partition 0 when unsharded), or -1
        when the guard held it back. ``vetted``: the full-state delta, checked by the caller.
        """
        delta = vetted
        if delta is None:
            delta = self._snapshot_delta()
            if not self._vet(delta, "snapshot"):
                return -1
        version = int(delta.to_version)
        sid = self._next_id()
        begins = [self._header(SNAPSHOT_BEGIN, watermark_ms, p, publish_id=sid, snapshot_id=sid)
                  for p in self.partitions]
        begin_offsets = {p: int(meta.offset) for p, meta in
                         zip(self.partitions, self._sync(self._send(begins, "snapshot")))}
        body = self._row_messages(delta, watermark_ms, sid)
        tower = self.tower_bytes()
        for p in self.partitions:  # each partition's snapshot names the model config
            body += payload_chunks(self._header(DENSE, watermark_ms, p, publish_id=self._next_id(),
                                                snapshot_id=sid), tower, self.cfg.max_message_bytes)
        counts = {p: 0 for p in self.partitions}
        for m in body:
            counts[self._partition(m)] += 1
        ends = []
        for p in self.partitions:
            end = self._header(SNAPSHOT_END, watermark_ms, p, publish_id=sid, snapshot_id=sid,
                               chunk_count=counts[p] + 2)
            end.snapshot_offset = begin_offsets[p]
            ends.append(end)
        self._sync(self._send(body, "snapshot") + self._send(ends, "snapshot"))
        self._tower_digest = hashlib.blake2b(tower, digest_size=16).digest()
        self.snapshot_offsets = begin_offsets
        self.published_version = version
        PUBLISHED_VERSION.set(version)
        log.info("snapshot %d at offsets %s: version %d, %d messages", sid, begin_offsets, version,
                 len(body) + 2 * len(self.partitions))
        return begin_offsets[self.control]

    def _heartbeats(self, msgs: list[ParamsMessage], delta: TableDelta, watermark_ms: int) -> list[ParamsMessage]:
        """An empty sparse message for each partition this publish left out (sharded only).

        A shard none of whose rows changed still learns the new version and watermark, so the
        fleet's version (the oldest shard's) and freshness stay exact.
        """
        idle = set(self.partitions) - {self._partition(m) for m in msgs}
        if self.cfg.num_param_shards == 1 or not idle:
            return []
        slot = sorted(self.table.slots)[0]
        empty = SlotDelta(ids=np.zeros(0, np.int64), values=torch.zeros(0, self.table.slots[slot].dim))
        (payload,) = encode_delta(TableDelta(from_version=max(delta.from_version, 0),
                                             to_version=delta.to_version, slots={slot: empty}))
        return [self._header(SPARSE, watermark_ms, p, publish_id=self._next_id(), slot=slot,
                             from_version=max(delta.from_version, 0), payload=payload)
                for p in sorted(idle)]

    def _split(self, delta: TableDelta) -> dict[int, TableDelta]:
        """The delta per shard partition (all of it on partition 0 when unsharded)."""
        n = self.cfg.num_param_shards
        if n == 1:
            return {0: delta}
        out = {p: TableDelta(from_version=delta.from_version, to_version=delta.to_version, slots={})
               for p in range(n)}
        for name, sd in delta.slots.items():
            owner, downer = shard_of(sd.ids, n), shard_of(sd.deleted_ids, n)
            for p in range(n):
                mine = owner == p
                out[p].slots[name] = SlotDelta(ids=sd.ids[mine], values=sd.values[torch.from_numpy(mine)],
                                               deleted_ids=sd.deleted_ids[downer == p])
        return out

    def _row_messages(self, delta: TableDelta, watermark_ms: int, snapshot_id: int) -> list[ParamsMessage]:
        """One publish per non-empty slot and shard, chunked by ``encode_delta`` under the size limit."""
        msgs: list[ParamsMessage] = []
        for partition, part in self._split(delta).items():
            msgs += self._slot_messages(part, watermark_ms, snapshot_id, partition)
        return msgs

    def _slot_messages(self, delta: TableDelta, watermark_ms: int, snapshot_id: int,
                       partition: int) -> list[ParamsMessage]:
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
            msgs += [self._header(SPARSE, watermark_ms, partition, publish_id=pid, slot=slot,
                                  from_version=one.from_version, snapshot_id=snapshot_id,
                                  chunk_index=i, chunk_count=len(chunks), rows=int(sd.ids.size),
                                  payload=c)
                     for i, c in enumerate(chunks)]
        return msgs
