"""A replica of the trainer's parameters, kept current by applying ``hw.params`` messages in order.

The protocol keeps the tower's bytes opaque: a dense payload is whatever the model definition
serialises (safetensors carrying its config). A replica joins the chunks and hands the bytes to
the :data:`TowerLoader` it was built with, which returns the tower and the table layout it names;
serving passes the model definition's (:class:`serving.replica.ModelReplica`), so this package
never imports the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from paramsync.retrieval_slots import RETRIEVAL_SLOTS
from paramsync.wire import DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END, SPARSE, ParamsMessage, join_payload

log = logging.getLogger(__name__)

__all__ = ["LoadedTower", "TowerLoader", "ReplicaState", "add_retrieval_slots"]


@dataclass(frozen=True)
class LoadedTower:
    """A dense payload decoded by a :data:`TowerLoader`: the tower and the table it scores with."""

    tower: Any
    slots: tuple[str, ...]
    embedding_dim: int


TowerLoader = Callable[[bytes], LoadedTower]
"""Rebuilds a tower from a dense payload (all chunks joined); raises ``ValueError`` on bad bytes."""


def add_retrieval_slots(table: Any, delta: Any) -> None:
    """Adds each retrieval slot ``delta`` has rows of and ``table`` lacks, as wide as its rows
    (the tower names only the ranker's slots). Any other unknown slot stays an error."""
    from embedding_store import SlotConfig

    for name, sd in delta.slots.items():
        if name not in table.slots and name in RETRIEVAL_SLOTS and sd.values.dim() == 2:
            table.add_slot(SlotConfig(name=name, dim=int(sd.values.shape[1])))


def _import(table: Any, delta: Any) -> None:
    add_retrieval_slots(table, delta)
    table.import_delta(delta)


@dataclass
class ReplicaState:
    """A serving-side replica: an ``EmbeddingTable`` plus the dense tower, kept current.

    Sparse messages go to ``table.import_delta``; dense chunks are joined and loaded into a new
    tower by ``load_tower``. A snapshot is staged until its end marker, then *replaces* table and
    tower (the table is rebuilt from the slots and dim the snapshot's tower names, on
    ``device``). Until the first complete snapshot, live messages are ignored: a replica starts at
    :func:`paramsync.bootstrap_offset`.
    """

    model_id: str
    table: Any = None
    tower: Any = None
    version: int = -1
    watermark_ms: int = -1
    snapshot_id: int = -1
    applied: int = 0
    device: Any = "cpu"  # where the table lives (the loader puts the tower there too)
    load_tower: TowerLoader = field(kw_only=True, repr=False)
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

        staged, self._loading, self._staged = self._staged, -1, []
        if len(staged) + 2 != end.chunk_count:
            log.warning("snapshot %d incomplete (%d of %d messages); ignored", end.snapshot_id,
                        len(staged) + 2, end.chunk_count)
            return
        dense = [m for m in staged if m.kind == DENSE]
        loaded = self.load_tower(join_payload(dense))
        table = EmbeddingTable([SlotConfig(name=s, dim=loaded.embedding_dim) for s in loaded.slots],
                               device=self.device)
        for m in staged:
            if m.kind == SPARSE:
                _import(table, m.table_delta())
        self.table, self.tower, self._dense_chunks = table, loaded.tower, {}
        self.snapshot_id = end.snapshot_id
        self.version, self.watermark_ms = end.version, end.watermark_ms
        self.applied += len(staged) + 2

    def _apply_live(self, msg: ParamsMessage) -> None:
        if msg.kind == SPARSE:
            _import(self.table, msg.table_delta())
        elif msg.kind == DENSE:
            chunks = self._dense_chunks.setdefault(msg.publish_id, [])
            chunks.append(msg)
            if len(chunks) < msg.chunk_count:
                self.applied += 1
                return  # the version a tower names is served once the whole tower is
            self.tower = self.load_tower(join_payload(chunks)).tower
            del self._dense_chunks[msg.publish_id]
        self.version = max(self.version, msg.version)
        self.watermark_ms = max(self.watermark_ms, msg.watermark_ms)
        self.applied += 1
