"""Sharded checkpoints: one ordinary checkpoint per rank plus one manifest, and re-sharding on restore.

Layout under the checkpoint directory::

    shard-000-of-002/           rank 0's checkpoint (training.checkpoint.CheckpointStore layout:
    shard-001-of-002/             tables/<seq>/ RocksDB, state-<seq>.safetensors, its own
                                  MANIFEST.json)
    SHARDED_MANIFEST.json       written LAST, by rank 0, after every shard is durable: which
                                table directory and state file of which shard belong to this
                                checkpoint, and the consumer offsets (all partitions, all
                                ranks) it covers

Order of a write: every rank writes its shard (``CheckpointStore.write``) -> an all-gather of the
shard manifests (which is also the barrier) -> rank 0 writes ``SHARDED_MANIFEST.json``
atomically -> a barrier, after which ranks may commit offsets. A crash before the manifest (a
rank killed between its table and the sharded manifest) leaves the previous one valid, and a
restart reads only what it names: each shard's own table directory and state file, one cut with
the offsets, even where that shard's own ``MANIFEST.json`` is already a checkpoint ahead (its
table would hold updates of examples the offsets replay: trained twice). The restarted rank's
store then continues from the named checkpoint (:meth:`CheckpointStore.continue_from`), so it
is kept until a newer sharded manifest names another. Sharded manifests written before the
table directory was recorded find it by the shard's ``seq`` among that store's kept manifests.

Restoring onto the same number of ranks loads each rank's own shard. Onto a different number,
each new rank reads every old shard's table and keeps the rows it owns now
(``shard_of(id, new_world) == rank``), optimizer state included; the dense tower, its optimizer
and the evaluator come from old shard ``min(rank, old_world - 1)`` (all ranks' towers are equal
under DDP). Each rank's checkpoint carries its cold-start hold (the early negatives it holds
while warming up, :class:`training.delayed_feedback.ColdStartHold`): the same number of ranks
restores each its own; a re-shard gives each new rank the held rows of every old shard whose
impression it owns now, so each is trained once. A plain one-process checkpoint
(``MANIFEST.json`` at the root) restores as a checkpoint of one shard, so a single trainer can
be scaled out.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedding_store.sharding import shard_of
from training.checkpoint import (MANIFEST, CheckpointCorruptError, CheckpointManifest,
                                 CheckpointStore, atomic_write_bytes)
from training.config import TrainerConfig
from training.learner import Learner

log = logging.getLogger(__name__)

__all__ = ["SHARDED_MANIFEST", "ShardedManifest", "ShardedCheckpointer", "shard_dir_name"]

SHARDED_MANIFEST = "SHARDED_MANIFEST.json"
FORMAT = 1


def shard_dir_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:03d}-of-{world_size:03d}"


@dataclass
class ShardedManifest:
    """One sharded checkpoint: per-shard entries (dir, state_file, seq, ...) and global offsets."""

    seq: int
    world_size: int
    shards: list[dict[str, Any]]
    offsets: dict[str, int]
    examples_trained: int = 0
    watermark_ms: int = -1
    created_s: float = 0.0
    format: int = FORMAT

    def offsets_by_partition(self) -> dict[tuple[str, int], int]:
        return CheckpointManifest(seq=0, state_file="", offsets=self.offsets,
                                  table_version=0).offsets_by_partition()

    def shard_manifest(self, index: int) -> CheckpointManifest:
        """Shard ``index``'s entry as the ``CheckpointManifest`` its ``CheckpointStore`` reads."""
        e = self.shards[index]
        return CheckpointManifest(seq=int(e["seq"]), state_file=e["state_file"],
                                  offsets=dict(e.get("offsets", {})),
                                  table_version=int(e.get("table_version", 0)),
                                  examples_trained=int(e.get("examples_trained", 0)),
                                  watermark_ms=int(e.get("watermark_ms", -1)),
                                  state_sha256=str(e.get("state_sha256", "")),
                                  table_dir=str(e.get("table_dir", "")))


def _entry(manifest: CheckpointManifest, dir_name: str) -> dict[str, Any]:
    """A shard's entry in the sharded manifest: everything a restart needs to read that shard."""
    return {"dir": dir_name, "state_file": manifest.state_file, "seq": manifest.seq,
            "offsets": manifest.offsets, "table_version": manifest.table_version,
            "examples_trained": manifest.examples_trained, "watermark_ms": manifest.watermark_ms,
            "state_sha256": manifest.state_sha256, "table_dir": manifest.table_dir}


class ShardedCheckpointer:
    """Writes and restores the sharded checkpoints of rank ``rank`` of ``world_size`` under ``root``."""

    def __init__(self, root: Path | str, rank: int, world_size: int) -> None:
        self.root = Path(root)
        self.rank, self.world = rank, world_size
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(self.root / shard_dir_name(rank, world_size))

    # -- reading ----------------------------------------------------------------------------
    def latest(self) -> ShardedManifest | None:
        """The newest complete sharded checkpoint; a plain one-process checkpoint counts as one shard."""
        path = self.root / SHARDED_MANIFEST
        if path.exists():
            try:
                m = ShardedManifest(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"sharded checkpoint manifest {path} is unreadable: {exc}") from None
            if m.format != FORMAT or len(m.shards) != m.world_size:
                raise ValueError(f"sharded checkpoint manifest {path}: unsupported format or "
                                 f"{len(m.shards)} shards for world size {m.world_size}")
            return m
        plain = CheckpointStore(self.root).latest() if (self.root / MANIFEST).exists() else None
        if plain is None:
            return None
        return ShardedManifest(seq=plain.seq, world_size=1, shards=[_entry(plain, ".")],
                               offsets=plain.offsets,
                               examples_trained=plain.examples_trained,
                               watermark_ms=plain.watermark_ms, created_s=plain.created_s)

    def restore(self, cfg: TrainerConfig) -> tuple[Learner, ShardedManifest] | None:
        """This rank's learner (its shard of the table) from the newest checkpoint, or None."""
        from embedding_store import EmbeddingTable

        m = self.latest()
        if m is None:
            return None
        src = min(self.rank, m.world_size - 1)
        src_store, src_manifest = self._shard(m, src)
        tensors, meta = src_store.load_state(src_manifest)
        if m.world_size == self.world:
            table = EmbeddingTable.load(str(src_store.table_path_of(src_manifest)))
            if src_store.root == self.store.root:
                self.store.continue_from(src_manifest)
        else:
            table = self._reshard(m, [store.table_path_of(sm) for store, sm in
                                      (self._shard(m, i) for i in range(m.world_size))])
            self._reshard_hold(m, src, tensors, meta)
        learner = Learner.restore(cfg, table, tensors, meta)
        log.info("rank %d/%d restored sharded checkpoint %d (written by %d ranks): %d rows",
                 self.rank, self.world, m.seq, m.world_size,
                 sum(int(s["live_rows"]) for s in table.stats().values()))
        return learner, m

    def _shard(self, m: ShardedManifest, index: int) -> tuple[CheckpointStore, CheckpointManifest]:
        """Shard ``index``'s store and the checkpoint of it that ``m`` names (table and state)."""
        store = CheckpointStore(self.root / m.shards[index]["dir"])
        manifest = m.shard_manifest(index)
        if not manifest.table_dir:  # written before the entry recorded it: the store knows it
            kept = store.find(manifest.seq)
            if kept is None or kept.state_file != manifest.state_file:
                raise CheckpointCorruptError(
                    f"sharded checkpoint {m.seq}: shard {m.shards[index]['dir']} no longer holds "
                    f"its checkpoint {manifest.seq}")
            manifest = kept
        return store, manifest

    def _reshard_hold(self, m: ShardedManifest, src: int, tensors: dict[str, torch.Tensor],
                      meta: dict[str, str]) -> None:
        """Replaces shard ``src``'s cold-start hold in ``tensors``/``meta`` by this rank's share
        of every old shard's held rows (:func:`training.distributed.early.reshard_hold`)."""
        from training.distributed.early import reshard_hold

        states = []
        for i in range(m.world_size):
            if i == src:
                t, mt = tensors, meta
            else:
                store, sm = self._shard(m, i)
                t, mt = store.load_state(sm)
            states.append((t["cold_hold.rows"].numpy().tobytes(), json.loads(mt["cold_hold"]))
                          if "cold_hold" in mt else None)
        tensors.pop("cold_hold.rows", None)
        meta.pop("cold_hold", None)
        merged = reshard_hold(states, self.rank, self.world)
        if merged is not None:
            tensors["cold_hold.rows"] = torch.frombuffer(bytearray(merged[0]), dtype=torch.uint8)
            meta["cold_hold"] = json.dumps(merged[1])

    def _reshard(self, m: ShardedManifest, table_paths: list[Path]) -> Any:
        """A table holding this rank's ids from every old shard (values and optimizer state)."""
        from embedding_store import EmbeddingTable, SlotDelta, TableDelta

        table = None
        now = m.watermark_ms / 1000.0 if m.watermark_ms > 0 else time.time()
        for path in table_paths:
            old = EmbeddingTable.load(str(path))
            if table is None:
                table = EmbeddingTable(list(old.slots.values()), device="cpu", seed=old.seed)
            delta = old.export_delta(since_version=0, with_state=True)
            for name, sd in delta.slots.items():
                mine = shard_of(sd.ids, self.world) == self.rank
                keep = torch.from_numpy(np.flatnonzero(mine))
                delta.slots[name] = SlotDelta(
                    ids=sd.ids[mine], values=sd.values.index_select(0, keep),
                    state={k: v.index_select(0, keep) for k, v in (sd.state or {}).items()})
            table.import_delta(TableDelta(from_version=0, to_version=0, slots=delta.slots), now=now)
        return table

    # -- writing ----------------------------------------------------------------------------
    def write(self, learner: Learner, offsets: dict[tuple[str, int], int]) -> ShardedManifest | None:
        """Collective: every rank writes its shard, then rank 0 the manifest.

        Returns the manifest on every rank (its ``seq`` is meaningful on rank 0 only).
        """
        from training.distributed.exchange import agree_json

        sm = self.store.write(learner.table, *learner.state(), offsets, int(learner.table.version),
                              learner.examples_trained, learner.watermark_ms)
        mine = _entry(sm, shard_dir_name(self.rank, self.world))
        entries = agree_json(mine) if self.world > 1 else [mine]  # also the "all shards durable" barrier
        prev = self.latest() if self.rank == 0 else None
        merged: dict[str, int] = {}
        for e in entries:
            for key, off in e["offsets"].items():
                merged[key] = max(merged.get(key, 0), int(off))
        m = ShardedManifest(seq=(prev.seq + 1) if prev else 1, world_size=self.world,
                            shards=entries, offsets=merged,
                            examples_trained=sum(int(e["examples_trained"]) for e in entries),
                            watermark_ms=max(int(e["watermark_ms"]) for e in entries),
                            created_s=time.time())
        if self.rank == 0:
            atomic_write_bytes(self.root / SHARDED_MANIFEST, json.dumps(asdict(m), indent=1).encode())
            if prev is not None and prev.world_size != self.world:
                self._drop_old_shards(m)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # nobody commits offsets before the manifest is durable
        return m

    def _drop_old_shards(self, m: ShardedManifest) -> None:
        """After a re-shard, the old layout's shard directories are no longer referenced."""
        keep = {e["dir"] for e in m.shards}
        for p in self.root.glob("shard-*-of-*"):
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
                log.info("removed shard directory %s of the previous layout", p.name)
