"""The serving parameter server: a replica of the trainer's parameters, kept seconds fresh.

It tails ``hw.params`` (format: :mod:`paramsync.wire`) and applies each message with
:class:`paramsync.ReplicaState` semantics: sparse deltas into an
``embedding_store.EmbeddingTable``, dense safetensors into a new tower, snapshots replacing both.
A fresh replica bootstraps from the newest complete snapshot (``bootstrap_offset``) and then
follows; it never replays the whole topic.

Warm restart: every ``persist_interval_s`` (and on stop) the replica is saved under
``state_dir`` (:mod:`serving.replica_persistence`); a restart loads it and resumes at the saved
offset.

Sharding (``num_shards > 1``): the trainer publishes shard ``i``'s rows (placement:
:func:`shard_of`) to partition ``i`` of ``hw.params`` and the tower to the control partition N
(layout: :mod:`paramsync.wire`). A shard replica reads only its partition, so a fleet of
``headwater serve --role ps --shard i/N`` processes splits both the table and the tailing work; a
recommender replica reads only the control partition (``partition=control_partition(N)``): the
tower, and an empty table whose default vectors stand in for a shard that does not answer.
Every message names its shard; a replica that meets a partition published for another layout
stops with an error instead of serving a wrong table.

Pinning and rollback (``headwater params pin|rollback|unpin|status``): the replica keeps its last
``history_versions`` versions and acts on ``control`` messages on its partition; the pin itself
(which version is served, what is held back, where to read next) is :mod:`serving.version_pin`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prometheus_client import Counter, Gauge

from embedding_store.sharding import shard_of
from paramsync import (CONTROL, CONTROL_SHARD, DENSE, SNAPSHOT_BEGIN, SNAPSHOT_END, SPARSE, ControlCommand,
                       ParamsMessage, ParamsWireError, add_retrieval_slots, control_partition, join_payload)
from serving.params_admin import ParamsAdmin, ParamsStatus
from serving.replica_persistence import ReplicaPlace, ReplicaPosition, load_replica, save_replica
from serving.scoring import ServingModel
from serving.version_history import VersionHistory
from serving.version_pin import CommandResult, VersionPin

log = logging.getLogger(__name__)

__all__ = ["ParamServerConfig", "ParamServer", "ShardLayoutError", "shard_of", "parse_shard"]

COMMANDS = Counter("hw_serve_params_commands", "hw.params control commands acted on", ["action", "code"])
HELD_VERSIONS = Gauge("hw_serve_held_versions", "published versions a replica can pin or roll back to",
                      multiprocess_mode="livemin")


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
    replica_device: str = field(default="cpu", metadata={
        "help": "where the replica's table and tower live: cpu, or cuda[:N] (bag reads on the Triton "
                "kernels, the tower forward on the GPU, scores back on the host); not --device, "
                "which is the LLM engine's"})
    history_versions: int = field(default=120, metadata={
        "help": "published versions kept to pin or roll back to (headwater params); about this many "
                "sparse sync intervals back (0 or 1 = none)"})
    history_max_mb: float = field(default=256.0, metadata={"help": "memory the kept versions' row pre-images may take; beyond it the oldest versions go"})
    admin_port: int = field(default=0, metadata={
        "help": "HTTP admin endpoint for headwater params status|pin|rollback|unpin (0 = off); the "
                "processes of --processes share it"})
    admin_host: str = field(default="127.0.0.1", metadata={"help": "interface of the admin endpoint (it has no auth: keep it on loopback or a trusted network)"})

    def validate(self) -> None:
        from training.model import resolve_device

        resolve_device(self.replica_device)


class ParamServer:
    """Follows ``hw.params`` on a background thread; :meth:`current` is what serving scores with."""

    def __init__(self, cfg: ParamServerConfig, bootstrap_servers: str, topic: str,
                 on_update: Callable[[ServingModel], None] | None = None,
                 partition: int | None = None) -> None:
        """``partition``: which one to tail; default the shard's own (0 unsharded)."""
        from serving.replica import ModelReplica

        if not 0 <= cfg.shard_index < max(cfg.num_shards, 1):
            raise ValueError(f"shard_index {cfg.shard_index} out of range for {cfg.num_shards} shards")
        control = control_partition(cfg.num_shards)
        self.partition = (cfg.shard_index if cfg.num_shards > 1 else 0) if partition is None else partition
        if not 0 <= self.partition <= control:
            raise ValueError(f"partition {self.partition} out of range for {cfg.num_shards} shards")
        # The shard every message on the partition must name (the control partition: CONTROL_SHARD).
        self.expect_shard = CONTROL_SHARD if cfg.num_shards > 1 and self.partition == control else self.partition
        if self.expect_shard == CONTROL_SHARD and cfg.replica_device != "cpu":
            raise ValueError("replica_device: a recommender over PS shards holds no table (its rows come "
                             "over RPC, on the host); put the shards' replicas on the GPU instead")
        self.cfg = cfg
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.on_update = on_update
        self.state = ModelReplica(model_id=cfg.model_id, device=cfg.replica_device)
        self.next_offset = -1  # -1: not decided yet (bootstrap)
        self.restored = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_persist = time.monotonic()
        self.last_update_s = time.monotonic()  # last applied hw.params message (or start)
        self.error: BaseException | None = None
        self.history = VersionHistory(max(cfg.history_versions, 0), int(max(cfg.history_max_mb, 0) * (1 << 20)))
        self.pin = VersionPin(self.history, cfg.history_versions)
        self._staging = False  # between a snapshot's begin and end markers
        self._dense: dict[int, list[ParamsMessage]] = {}  # live tower chunks by publish id
        self.admin: Any = None
        self.place = ReplicaPlace(cfg.model_id, cfg.num_shards, cfg.shard_index, self.partition)
        if cfg.state_dir:
            self._restore(Path(cfg.state_dir))

    # -- what serving reads ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state.ready and self.state.table is not None and self.state.tower is not None

    @property
    def pinned_version(self) -> int | None:
        return self.pin.version

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
        if self.cfg.admin_port:
            self.admin = ParamsAdmin(self, self.cfg.admin_host, self.cfg.admin_port).start()
        self._thread = threading.Thread(target=self._run, name="param-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.admin is not None:
            self.admin.stop()
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
        from paramsync import ParamsFollower, bootstrap_offset

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
                changed = False
                for offset, msg in follower.poll(timeout_ms=self.cfg.poll_timeout_ms):
                    changed |= self._handle(offset, msg)
                    frozen = self.pin.frozen_at
                    self.next_offset = offset + 1 if frozen is None else min(offset + 1, frozen)
                    if self.pin.seek is not None:
                        break  # what was fetched past here is read again after the seek
                if self.pin.seek is not None:
                    follower.consumer.seek(follower.tp, self.pin.seek)
                    self.next_offset, self.pin.seek = self.pin.seek, None
                    self._dense.clear()
                    self._staging = False
                if changed and self.on_update is not None and self.ready:
                    self.on_update(self.current())
                if (self.cfg.state_dir and self.ready
                        and time.monotonic() - self._last_persist >= self.cfg.persist_interval_s):
                    self.persist()
        except BaseException as exc:
            self.error = exc
            log.exception("parameter server stopped on an error")
        finally:
            follower.close()

    def _layout_ok(self, msg: ParamsMessage) -> bool:
        return msg.num_shards == self.cfg.num_shards and msg.shard == self.expect_shard

    def _handle(self, offset: int, msg: ParamsMessage) -> bool:
        """One message read at ``offset``: a command, a message past the pin (noted, not
        applied), or an update to apply. Returns whether the served model changed."""
        if msg.model_id != self.cfg.model_id:
            return False
        self.last_update_s = time.monotonic()
        if msg.kind == CONTROL:
            return self._command(offset, msg)
        if self.pin.holds_back(offset):
            with self._lock:
                self.pin.note_later(offset, msg)
            return False
        self.apply(msg, offset)
        return True

    def apply(self, msg: ParamsMessage, offset: int | None = None) -> None:
        """Applies one decoded ``ParamsMessage`` after checking it belongs to this partition
        (``offset``: where it was read, for the version history)."""
        if msg.model_id != self.cfg.model_id:
            return
        if not self._layout_ok(msg):
            raise ShardLayoutError(
                f"{self.topic}[{self.partition}] holds shard {msg.shard} of {msg.num_shards}; this "
                f"replica expects shard {self.expect_shard} of {self.cfg.num_shards} (match the "
                f"trainer's num_param_shards)")
        with self._lock:
            s = self.state
            if s.ready and not msg.in_snapshot and msg.kind in (SPARSE, DENSE):
                self._apply_live(msg)
            else:
                loaded = s.snapshot_id
                s.apply(msg)
                self._staging = msg.kind == SNAPSHOT_BEGIN or (self._staging and msg.kind != SNAPSHOT_END)
                if s.snapshot_id != loaded:  # a snapshot replaced table and tower
                    self._dense.clear()
                    self.history.reset(s.version, s.watermark_ms, s.tower, -1 if offset is None else offset + 1)
            # A version's end is where a re-read reproduces it: never inside a snapshot or a tower.
            if offset is not None and s.ready and not self._staging and not self._dense:
                self.history.after_message(s.version, s.watermark_ms, s.tower, offset + 1)
            HELD_VERSIONS.set(len(self.history.entries))
        self.last_update_s = time.monotonic()

    def _apply_live(self, msg: ParamsMessage) -> None:
        """``ReplicaState``'s live semantics, keeping the pre-images of the rows a delta changes."""
        s = self.state
        if msg.kind == SPARSE:
            delta = msg.table_delta()
            add_retrieval_slots(s.table, delta)
            self.history.before_rows(msg.version, s.table, delta)
            s.table.import_delta(delta)
        else:
            chunks = self._dense.setdefault(msg.publish_id, [])
            chunks.append(msg)
            if len(chunks) < msg.chunk_count:
                s.applied += 1
                return  # the version a tower names is served once the whole tower is
            del self._dense[msg.publish_id]
            s.tower = s.load_tower(join_payload(chunks)).tower
        s.version = max(s.version, msg.version)
        s.watermark_ms = max(s.watermark_ms, msg.watermark_ms)
        s.applied += 1

    # -- pinning ---------------------------------------------------------------------------
    def _command(self, offset: int, msg: ParamsMessage) -> bool:
        if offset <= self.pin.commands_upto:
            return False  # acted on before this re-read
        self.pin.commands_upto = offset
        if not self._layout_ok(msg):
            log.warning("ignoring a control command at %s[%d]@%d written for shard %d of %d", self.topic,
                        self.partition, offset, msg.shard, msg.num_shards)
            return False
        try:
            cmd = ControlCommand.decode(msg.payload)
        except ParamsWireError as exc:
            log.warning("ignoring a bad control message at %s[%d]@%d: %s", self.topic, self.partition, offset, exc)
            return False
        with self._lock:
            result = self.pin.act(cmd, self.state, self.ready, self.next_offset)
            if result.ok and cmd.action == "pin":
                self._dense.clear()  # towers in flight belong to the versions left behind
        COMMANDS.labels(action=cmd.action, code=result.code).inc()
        what = f"pin {cmd.version}" if cmd.action == "pin" else cmd.action
        (log.info if result.ok else log.warning)("%s [%s]: %s", what, result.code, result.message)
        return result.ok

    # -- what the admin endpoint reads -------------------------------------------------------
    def pinnable(self, version: int) -> str | None:
        """None if ``version`` can be pinned here, else why not (for a NOT_FOUND answer)."""
        with self._lock:
            if not self.ready:
                return "no model loaded yet"
            return self.pin.unavailable(version)

    def previous_version(self) -> int | None:
        """The newest held version older than the one served (what ``rollback`` pins)."""
        with self._lock:
            older = [v for v in self.history.versions() if v < int(self.state.version)]
            return older[-1] if older else None

    def command_result(self, command_id: int) -> CommandResult | None:
        with self._lock:
            return self.pin.results.get(command_id)

    def params_status(self) -> ParamsStatus:
        """The version served, whether pinned, the versions held, freshness."""
        with self._lock:
            held = self.history.versions()
            s = self.state
            newest = max([*held, *self.pin.later], default=int(s.version))
            return ParamsStatus(
                model_id=self.cfg.model_id, ready=self.ready, version=int(s.version), newest_version=int(newest),
                pinned_version=self.pin.version, held_versions=tuple(held),
                history_bytes=int(self.history.bytes), watermark_ms=int(s.watermark_ms),
                freshness_lag_ms=self.freshness_lag_ms(), partition=self.partition,
                shard=f"{self.cfg.shard_index}/{self.cfg.num_shards}",
                error=None if self.error is None else str(self.error))

    # -- persistence ---------------------------------------------------------------------------
    def persist(self) -> None:
        """Saves the replica under ``state_dir`` (:mod:`serving.replica_persistence`)."""
        from training.model import tower_to_safetensors

        with self._lock:
            s = self.state
            table = s.table
            position = ReplicaPosition(self.next_offset, int(s.version), int(s.watermark_ms), int(s.snapshot_id))
            tower_bytes = tower_to_safetensors(s.tower)
        save_replica(Path(self.cfg.state_dir), self.place, position, table, tower_bytes)
        self._last_persist = time.monotonic()

    def _restore(self, root: Path) -> None:
        saved = load_replica(root, self.place, self.state.device)
        if saved is None:
            return
        s, p = self.state, saved.position
        s.table, s.tower = saved.table, saved.tower
        s.version, s.watermark_ms, s.snapshot_id = p.version, p.watermark_ms, p.snapshot_id
        self.next_offset = p.next_offset
        self.history.reset(s.version, s.watermark_ms, saved.tower, self.next_offset)
        self.restored = True
        log.info("replica restored from %s at offset %d (version %d)", root, self.next_offset, s.version)
