"""Publishing from N ranks to one ``hw.params``: each rank its shard's rows, rank 0 the dense tower.

Sparse deltas need no coordination: a rank's rows are disjoint from every other rank's, and a
replica applies rows as values. Snapshots do: a replica that loads a snapshot *replaces* its
state with it, so a snapshot must hold every shard. :meth:`ShardPublisher.publish_snapshot_collective`
assembles one: rank 0 writes the begin marker and broadcasts its id and offset, every rank sends
its whole shard under that id and flushes, the message counts are summed, and rank 0 writes the
dense tower and the end marker whose ``chunk_count`` covers them all. Ranks advance their
``snapshot_offset`` only after a barrier behind the end marker, so no message points at a snapshot
that is not complete yet.

With ``--num-param-shards M`` every rank splits its rows onto the ``hw.params`` partition of
their PS shard (``shard_of(id, M)``, :class:`DeltaPublisher`'s layout) and rank 0 writes the
tower to the control partition; each partition gets begin/end markers of the collective
snapshot. Which rank published a row does not matter to a replica. Each message's ``version`` is its rank's table version
(versions of different ranks are not comparable).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from embedding_store import SlotDelta
from paramsync import DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END, payload_chunks
from training.sync import DeltaPublisher, SyncConfig

log = logging.getLogger(__name__)

__all__ = ["ShardPublisher"]


class ShardPublisher(DeltaPublisher):
    """A :class:`DeltaPublisher` for one rank: sparse rows always, dense only on rank 0."""

    def __init__(self, producer: Any, topic: str, table: Any, tower_bytes: Callable[[], bytes],
                 cfg: SyncConfig, rank: int, world_size: int) -> None:
        super().__init__(producer, topic, table, tower_bytes, cfg)
        self.rank, self.world = rank, world_size
        self._publish_id += rank << 44  # publish ids of different ranks never collide

    def maybe_publish(self, watermark_ms: int, now: float | None = None) -> bool:
        """Rows changed since the last publish, and (rank 0) the tower when due; never a snapshot."""
        now = time.monotonic() if now is None else now
        sent = False
        if self.published_version >= 0 and now - self._last_sparse >= self.cfg.sparse_interval_s:
            self._last_sparse = now
            sent |= self.publish_sparse(watermark_ms)
        if self.rank == 0 and (self.dense_requested or now - self._last_dense >= self.cfg.dense_interval_s):
            self._last_dense = now
            self.dense_requested = False
            self.publish_dense(watermark_ms)
            sent = True
        return sent

    def publish_dense(self, watermark_ms: int, snapshot_id: int = -1) -> None:
        if self.rank == 0:
            super().publish_dense(watermark_ms, snapshot_id)

    def publish_snapshot_collective(self, watermark_ms: int) -> int:
        """Collective (every rank calls it): one snapshot holding every shard on every ``hw.params``
        partition; returns its begin offset on the control partition."""
        import torch.distributed as dist

        version = int(self.table.version)
        parts = self.partitions
        info = torch.zeros(1 + len(parts), dtype=torch.int64)
        if self.rank == 0:
            sid = self._next_id()
            begins = [self._header(SNAPSHOT_BEGIN, watermark_ms, p, publish_id=sid, snapshot_id=sid)
                      for p in parts]
            metas = self._sync(self._send(begins, "snapshot"))
            info[0] = sid
            info[1:] = torch.tensor([int(m.offset) for m in metas], dtype=torch.int64)
        if self.world > 1:
            dist.broadcast(info, src=0)
        sid = int(info[0])
        begin_offsets = {p: int(o) for p, o in zip(parts, info[1:].tolist())}
        delta = self.table.export_delta(since_version=0)
        for name, sd in delta.slots.items():  # a snapshot is the full state: no deletions
            delta.slots[name] = SlotDelta(ids=sd.ids, values=sd.values)
        msgs = self._row_messages(delta, watermark_ms, sid)
        self._sync(self._send(msgs, "snapshot"))
        counts = torch.zeros(len(parts), dtype=torch.int64)
        for m in msgs:
            counts[parts.index(self._partition(m))] += 1
        if self.world > 1:
            dist.all_reduce(counts)  # after it, every shard's rows are on the broker
        if self.rank == 0:
            tower, body = self.tower_bytes(), []
            for i, p in enumerate(parts):  # each partition's snapshot names the model config
                dense = payload_chunks(self._header(DENSE, watermark_ms, p, publish_id=self._next_id(),
                                                    snapshot_id=sid),
                                       tower, self.cfg.max_message_bytes)
                end = self._header(SNAPSHOT_END, watermark_ms, p, publish_id=sid, snapshot_id=sid,
                                   chunk_count=int(counts[i]) + len(dense) + 2)
                end.snapshot_offset = begin_offsets[p]
                body += dense + [end]
            self._sync(self._send(body, "snapshot"))
        if self.world > 1:
            dist.barrier()  # nobody points at this snapshot before its end markers are written
        self.snapshot_offsets = begin_offsets
        self.published_version = version
        now = time.monotonic()
        self._last_snapshot = self._last_sparse = now
        if self.rank == 0:
            self._last_dense = now
        log.info("rank %d: snapshot %d at offsets %s, %d row messages from %d ranks", self.rank,
                 sid, begin_offsets, int(counts.sum()), self.world)
        return begin_offsets[self.control]
