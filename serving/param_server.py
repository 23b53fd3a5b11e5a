"""The serving parameter server: a replica of the trainer's parameters, kept seconds fresh.

It tails ``hw.params`` (format: :mod:`training.params_wire`) and applies each message with
:class:`training.params_reader.ReplicaState` semantics: sparse deltas into an
``embedding_store.EmbeddingTable``, dense safetensors into a new tower, snapshots replacing both.
A fresh replica bootstraps from the newest complete snapshot (``bootstrap_offset``) and then
follows; it never replays the whole topic.

Warm restart: every ``persist_interval_s`` (and on stop) the replica is saved under
``state_dir``: the table as a RocksDB snapshot (incremental: only changed blocks), the tower as
safetensors, and ``meta.json`` last (the next offset to read, version, watermark). A restart loads
them and resumes at that offset. Re-applying a message after a crash between the writes is
harmless: rows and towers are values, not increments.

Sharding (``num_shards > 1``): the trainer publishes shard ``i``'s rows (placement:
:func:`shard_of`) to partition ``i`` of ``hw.params`` and the tower to the control partition N
(layout: :mod:`training.params_wire`). A shard replica reads only its partition, so a fleet of
``headwater serve --role ps --shard i/N`` processes splits both the table and the tailing work; a
recommender replica reads only the control partition (``partition=control_partition(N)``): the
tower, and an empty table whose default vectors stand in for a shard that does not answer.
Every message names its shard; a replica that meets a partition published for another layout
stops with an error instead of serving a wrong table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from embedding_store.sharding import shard_of
from serving.scoring import ServingModel
from training.params_wire import CONTROL_SHARD, control_partition

log = logging.getLogger(__name__)

__all__ = ["ParamServerConfig", "ParamServer", "ShardLayoutError", "shard_of", "parse_shard"]


class ShardLayoutError(RuntimeError):
    """The partition holds messages published for another shard layout than this replica's."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; a clear ``ValueError`` otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard wants INDEX/COUNT like 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: index must be in [0, {n})")
    return i, n


@dataclass
class ParamServerConfig:
    """Where the replica reads from, where it persists, and which shard it holds."""

    model_id: str = field(default="ctr", metadata={"help": "model id to follow on the topic"})
    state_dir: str = field(default="", metadata={"help": "persist the replica here for warm restarts (empty = memory only)"})
    persist_interval_s: float = field(default=10.0, metadata={"help": "save the replica this often"})
    num_shards: int = field(default=1, metadata={"help": "shards of the id space (1 = the whole table)"})
    shard_index: int = field(default=0, metadata={"help": "the shard this replica holds"})
    poll_timeout_ms: int = field(default=100, metadata={"help": "Kafka poll timeout"})


class ParamServer:
    """Follows ``hw.params`` on a background thread; :meth:`current` is what serving scores with."""

    def __init__(self, cfg: ParamServerConfig, bootstrap_servers: str, topic: str,
                 on_update: Callable[[ServingModel], None] | None = None,
                 partition: int | None = None) -> None:
        """``partition``: which one to tail; default the shard's own (0 unsharded)."""
        from training.params_reader import ReplicaState

        if not 0 <= cfg.shard_index < max(cfg.num_shards, 1):
            raise ValueError(f"shard_index {cfg.shard_index} out of range for {cfg.num_shards} shards")
        control = control_partition(cfg.num_shards)
        self.partition = (cfg.shard_index if cfg.num_shards > 1 else 0) if partition is None else partition
        if not 0 <= self.partition <= control:
            raise ValueError(f"partition {self.partition} out of range for {cfg.num_shards} shards")
        # The shard every message on the partition must name (the control partition: CONTROL_SHARD).
        self.expect_shard = CONTROL_SHARD if cfg.num_shards > 1 and self.partition == control else self.partition
        self.cfg = cfg
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.on_update = on_update
        self.state = ReplicaState(model_id=cfg.model_id)
        self.next_offset = -1  # -1: not decided yet (bootstrap)
        self.restored = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_persist = time.monotonic()
        self.last_update_s = time.monotonic()  # last applied hw.params message (or start)
        self.error: BaseException | None = None
        if cfg.state_dir:
            self._restore(Path(cfg.state_dir))

    # -- what serving reads ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state.ready and self.state.table is not None and self.state.tower is not None

    def current(self) -> ServingModel | None:
        with self._lock:
            if not self.ready:
                return None
            s = self.state
            return ServingModel(self.cfg.model_id, s.table, s.tower, int(s.version), int(s.watermark_ms))

    def freshness_lag_ms(self, now_ms: int | None = None) -> int:
        """Now minus the event-time watermark of the newest applied update (-1 before any)."""
        if self.state.watermark_ms < 0:
            return -1
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return max(now_ms - int(self.state.watermark_ms), 0)

    def params_age_s(self) -> float:
        """Seconds since the last hw.params message was applied (since start before any): the
        trainer publishes changed rows about every second, so a growing age means it is down."""
        return time.monotonic() - self.last_update_s

    # -- following the topic ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="param-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.cfg.state_dir and self.ready:
            self.persist()

    def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.ready and self.error is None:
            time.sleep(0.02)
        return self.ready

    def _run(self) -> None:
        from training.params_reader import ParamsFollower, bootstrap_offset

        try:
            if self.next_offset < 0:
                self.next_offset = bootstrap_offset(self.bootstrap_servers, self.topic,
                                                    partition=self.partition)
                log.info("bootstrapping %s[%d] from offset %d", self.topic, self.partition, self.next_offset)
            follower = ParamsFollower(self.bootstrap_servers, self.topic, self.next_offset, self.partition)
            end = follower.end_offset()
            if self.next_offset > end:  # the topic was recreated or truncated under us
                log.warning("saved offset %d is past the end of %s (%d); bootstrapping again",
                            self.next_offset, self.topic, end)
                follower.close()
                self.next_offset = bootstrap_offset(self.bootstrap_servers, self.topic,
                                                    partition=self.partition)
                follower = ParamsFollower(self.bootstrap_servers, self.topic, self.next_offset, self.partition)
        except BaseException as exc:  # surfaced through .error and health
            self.error = exc
            log.exception("parameter server could not start")
            return
        try:
            while not self._stop.is_set():
                applied = 0
                for offset, msg in follower.poll(timeout_ms=self.cfg.poll_timeout_ms):
                    self.apply(msg)
                    self.next_offset = offset + 1
                    applied += 1
                if applied and self.on_update is not None and self.ready:
                    self.on_update(self.current())
                if (self.cfg.state_dir and self.ready
                        and time.monotonic() - self._last_persist >= self.cfg.persist_interval_s):
                    self.persist()
        except BaseException as exc:
            self.error = exc
            log.exception("parameter server stopped on an error")
        finally:
            follower.close()

    def apply(self, msg) -> None:
        """Applies one decoded ``ParamsMessage`` after checking it belongs to this partition."""
        if msg.model_id == self.cfg.model_id and (msg.num_shards != self.cfg.num_shards
                                                  or msg.shard != self.expect_shard):
            raise ShardLayoutError(
                f"{self.topic}[{self.partition}] holds shard {msg.shard} of {msg.num_shards}; this "
                f"replica expects shard {self.expect_shard} of {self.cfg.num_shards} (match the "
                f"trainer's num_param_shards)")
        with self._lock:
            self.state.apply(msg)
        self.last_update_s = time.monotonic()

    # -- persistence ---------------------------------------------------------------------------
    def persist(self) -> None:
        """Saves table (RocksDB), tower and meta under ``state_dir``; meta is written last."""
        from training.model import tower_to_safetensors

        root = Path(self.cfg.state_dir)
        root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            s = self.state
            table, tower = s.table, s.tower
            meta = {"model_id": self.cfg.model_id, "next_offset": self.next_offset, "version": int(s.version),
                    "watermark_ms": int(s.watermark_ms), "snapshot_id": int(s.snapshot_id),
                    "num_shards": self.cfg.num_shards, "shard_index": self.cfg.shard_index,
                    "partition": self.partition}
            tower_bytes = tower_to_safetensors(tower)
            meta["tower_sha256"] = hashlib.sha256(tower_bytes).hexdigest()  # checked on restore
        table.save(str(root / "table"), incremental=True)
        _atomic_write(root / "tower.safetensors", tower_bytes)
        _atomic_write(root / "meta.json", json.dumps(meta).encode())
        self._last_persist = time.monotonic()
        log.info("replica persisted at offset %d (version %d)", meta["next_offset"], meta["version"])

    def _restore(self, root: Path) -> None:
        from embedding_store import EmbeddingTable
        from training.model import tower_from_safetensors

        meta_path = root / "meta.json"
        if not meta_path.exists():
            return
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            log.error("replica meta %s is unreadable (%s); bootstrapping from the topic", meta_path, exc)
            return
        if meta.get("model_id") != self.cfg.model_id or meta.get("num_shards") != self.cfg.num_shards \
                or meta.get("shard_index") != self.cfg.shard_index \
                or meta.get("partition", 0) != self.partition:
            log.warning("state in %s is for another model or shard; starting cold", root)
            return
        try:
            table = EmbeddingTable.load(str(root / "table"))
            tower_bytes = (root / "tower.safetensors").read_bytes()
            if meta.get("tower_sha256") not in (None, hashlib.sha256(tower_bytes).hexdigest()):
                raise ValueError("tower.safetensors fails its sha256 (truncated or corrupted)")
            tower, _ = tower_from_safetensors(tower_bytes)
        except Exception as exc:  # corrupt or partial state: Kafka still has everything
            log.error("replica state in %s is unusable (%s); bootstrapping from the topic", root, exc)
            return
        s = self.state
        s.table, s.tower = table, tower
        s.version, s.watermark_ms, s.snapshot_id = meta["version"], meta["watermark_ms"], meta["snapshot_id"]
        self.next_offset = int(meta["next_offset"])
        self.restored = True
        log.info("replica restored from %s at offset %d (version %d)", root, self.next_offset, s.version)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
