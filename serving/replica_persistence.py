"""Warm restart of a serving replica: its table, tower and read position, saved under ``state_dir``.

Why: a replica that restarts cold must bootstrap from the newest snapshot on ``hw.params``; one
that saved its state resumes where it stopped. The table goes as a RocksDB snapshot (incremental:
only changed blocks), the tower as safetensors, and ``meta.json`` last (the next offset to read,
version, watermark, the tower's sha256). Re-applying a message after a crash between the writes
is harmless: rows and towers are values, not increments. A state that is missing, unreadable,
corrupt or saved for another model or shard is not loaded: Kafka still has everything.

Companions: state derived from the table (the ANN item index, :mod:`serving.ann_retrieval`) is
saved beside it, in ``root/<name>``, each time the replica is: its owner :func:`attach`-es it to
the root and loads it back itself. A companion that fails to save is logged, never the replica's
save's failure (a restart rebuilds it from the table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["ReplicaCompanion", "ReplicaPlace", "ReplicaPosition", "SavedReplica", "attach", "load_replica",
           "save_replica"]

log = logging.getLogger(__name__)


class ReplicaCompanion(Protocol):
    """State saved beside a replica's table, in ``root/<name>``."""

    name: str

    def save_beside(self, directory: Path) -> None: ...


_companions: dict[Path, dict[str, "weakref.ref[Any]"]] = {}
_companions_lock = threading.Lock()


def attach(root: Path, companion: ReplicaCompanion) -> Path:
    """Saves ``companion`` with every replica save under ``root`` (until it is garbage, or another
    of the same name is attached there); returns its directory."""
    root = Path(root).resolve()
    with _companions_lock:
        _companions.setdefault(root, {})[companion.name] = weakref.ref(companion)
    return root / companion.name


def _save_companions(root: Path) -> None:
    with _companions_lock:
        refs = list(_companions.get(root.resolve(), {}).values())
    for c in (r() for r in refs):
        if c is None:
            continue
        try:
            c.save_beside(root / c.name)
        except Exception:  # derived state: a restart rebuilds it from the table
            log.exception("saving %s beside the replica in %s failed", c.name, root)


@dataclass(frozen=True, slots=True)
class ReplicaPlace:
    """Which replica a saved state belongs to: the model, the shard layout and the partition."""

    model_id: str
    num_shards: int
    shard_index: int
    partition: int


@dataclass(frozen=True, slots=True)
class ReplicaPosition:
    """Where a replica stands on its partition: the next offset to read and what it has applied."""

    next_offset: int
    version: int
    watermark_ms: int
    snapshot_id: int


@dataclass(frozen=True, slots=True)
class SavedReplica:
    """A replica loaded back from ``state_dir``."""

    table: Any  # embedding_store.EmbeddingTable
    tower: Any  # training.model.DenseTower
    position: ReplicaPosition


def save_replica(root: Path, place: ReplicaPlace, position: ReplicaPosition, table: Any,
                 tower_bytes: bytes) -> None:
    """Saves table (RocksDB), tower (its safetensors bytes) and meta under ``root``; meta last."""
    root.mkdir(parents=True, exist_ok=True)
    meta = {"model_id": place.model_id, "next_offset": position.next_offset, "version": position.version,
            "watermark_ms": position.watermark_ms, "snapshot_id": position.snapshot_id,
            "num_shards": place.num_shards, "shard_index": place.shard_index, "partition": place.partition,
            "tower_sha256": hashlib.sha256(tower_bytes).hexdigest()}  # checked on restore
    table.save(str(root / "table"), incremental=True)
    _save_companions(root)
    _atomic_write(root / "tower.safetensors", tower_bytes)
    _atomic_write(root / "meta.json", json.dumps(meta).encode())
    log.info("replica persisted at offset %d (version %d)", meta["next_offset"], meta["version"])


def load_replica(root: Path, place: ReplicaPlace, device: Any = "cpu") -> SavedReplica | None:
    """The replica saved under ``root`` for ``place``, table and tower on ``device``; None
    (logged) if there is none to use."""
    from embedding_store import EmbeddingTable
    from serving.replica import load_dense_tower

    meta_path = root / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        log.error("replica meta %s is unreadable (%s); bootstrapping from the topic", meta_path, exc)
        return None
    if meta.get("model_id") != place.model_id or meta.get("num_shards") != place.num_shards \
            or meta.get("shard_index") != place.shard_index \
            or meta.get("partition", 0) != place.partition:
        log.warning("state in %s is for another model or shard; starting cold", root)
        return None
    try:
        table = EmbeddingTable.load(str(root / "table"), device=device)
        tower_bytes = (root / "tower.safetensors").read_bytes()
        if meta.get("tower_sha256") not in (None, hashlib.sha256(tower_bytes).hexdigest()):
            raise ValueError("tower.safetensors fails its sha256 (truncated or corrupted)")
        tower = load_dense_tower(tower_bytes, device).tower
    except Exception as exc:  # corrupt or partial state: Kafka still has everything
        log.error("replica state in %s is unusable (%s); bootstrapping from the topic", root, exc)
        return None
    position = ReplicaPosition(int(meta["next_offset"]), meta["version"], meta["watermark_ms"], meta["snapshot_id"])
    return SavedReplica(table, tower, position)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
