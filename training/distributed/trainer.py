"""The multi-rank online trainer: one :class:`OnlineTrainer` loop per rank, in lockstep.

Each rank is a member of the one consumer group on ``hw.examples`` and so reads its own
partitions (the topic needs at least as many partitions as ranks; a rank without partitions
still trains every step, with empty batches). Every loop iteration every rank polls, then one
small ``all_reduce`` agrees on what happens next: whether any rank has a mini-batch due (then all
train one global step together, empty-handed ranks included; while an early stream's cold-start
hold is open, as many as the rank with the most released rows needs, see
:class:`~training.distributed.learner.ShardedLearner`), whether a checkpoint or a snapshot
is due (rank 0's clock decides), and whether to stop (any rank stopped by a signal, the global
``max_examples`` reached, or every rank idle for ``idle_exit_s``). Sparse deltas are published
by each rank on its own clock; they need no agreement.
"""

from __future__ import annotations

import logging
from dataclasses import replace
import threading
import time
from typing import Any, Callable

from kafka.errors import KafkaError

from paramsync import ensure_params_partitions
from streams.events import ExampleBatch
from streams.kafka_io import KafkaConfig
from training.batching import MiniBatch
from training.config import TrainerConfig
from training.distributed.consumer import RankConsumer
from training.distributed.checkpoint import ShardedCheckpointer, ShardedManifest
from training.distributed.env import DistEnv
from training.distributed.exchange import agree_json, all_reduce_sum
from training.distributed.learner import ShardedLearner
from training.distributed.publisher import ShardPublisher
from training.learner import Learner, make_table, model_config_for
from training.model import tower_to_safetensors
from training.trainer import CHECKPOINTS, DUPLICATES, EXAMPLES, WATERMARK, OnlineTrainer

log = logging.getLogger(__name__)

__all__ = ["DistributedTrainer"]


class DistributedTrainer(OnlineTrainer):
    """Rank ``env.rank`` of a multi-rank trainer (the process group must already be joined)."""

    def __init__(self, cfg: TrainerConfig, kafka: KafkaConfig, env: DistEnv) -> None:
        if cfg.counters or cfg.crosses or cfg.slot_pooling:
            # In-batch counts are rank-local, which would break the equivalence with one process
            # that this trainer keeps; counters, crossed slots and per-slot pooling (the sharded
            # exchange pools every slot one way) are single-process for now.
            log.warning("multi-rank training runs without per-id counters, crossed slots and "
                        "per-slot pooling (every slot pools by %s)", cfg.pooling)
            cfg = replace(cfg, counters=False, crosses=(), slot_pooling=())
        self.env = env
        self.rank, self.world = env.rank, env.world_size
        self.sl: ShardedLearner | None = None
        self.sharded_ckpt = (ShardedCheckpointer(cfg.checkpoint_dir, self.rank, self.world)
                             if cfg.checkpoint_dir else None)
        self.sharded_manifest: ShardedManifest | None = None
        self.global_examples = 0
        self.idle_steps = 0
        self._snapshot_due = False
        self._busy = False
        self._stop_all = False
        self._first_step = self._last_step = 0.0  # monotonic times of the first/last global step
        self.rank_stats: list[dict] = []  # every rank's exchange figures, gathered at finish
        super().__init__(cfg, kafka)
        self.store = None  # checkpoints go through self.sharded_ckpt
        self._check_partitions()

    # -- set-up ---------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.sharded_ckpt is None:
            return
        restored = self.sharded_ckpt.restore(self.cfg)
        if restored is None:
            return
        self.learner, m = restored
        self._attach(self.learner)
        self.resume_offsets = m.offsets_by_partition()
        self.done_offsets = dict(self.resume_offsets)
        self.sharded_manifest = m
        self.global_examples = m.examples_trained

    def _attach(self, learner: Learner) -> None:
        self.learner = learner
        self.sl = ShardedLearner(learner, self.rank, self.world)

    def _start_publisher(self) -> None:
        if not self.cfg.publish:
            return
        assert self.learner is not None
        c = self.cfg
        sync = self._sync_config()
        if c.num_param_shards > 1:
            if self.rank == 0:
                ensure_params_partitions(self.kafka.bootstrap_servers, self.topics.params,
                                         c.num_param_shards)
            if self.world > 1:
                import torch.distributed as dist

                dist.barrier()  # the other ranks' publishers check the partitions exist
        learner = self.learner
        self.publisher = ShardPublisher(
            self.producer, self.topics.params, learner.table,
            lambda: tower_to_safetensors(learner.tower, {"examples_trained": str(self.global_examples)}),
            sync, self.rank, self.world)
        self._snapshot_due = True  # every rank reaches this in the same step: the first publish

    def _make_consumer(self) -> RankConsumer:
        return RankConsumer(self.kafka, self.topics.examples, self.cfg.group_id, self.rank,
                            self.world, fetch_max_wait_ms=self.cfg.fetch_max_wait_ms)

    def _check_partitions(self) -> None:
        parts = self.consumer.partitions
        if self.rank == 0 and len(parts) < self.world:
            log.warning("%s has %d partitions for %d ranks: %d rank(s) will train only empty "
                        "batches (create it with --partitions >= %d)", self.topics.examples,
                        len(parts), self.world, self.world - len(parts), self.world)

    # -- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None,
            on_progress: Callable[[dict], None] | None = None, progress_every_s: float = 1.0) -> dict:
        stop = stop or threading.Event()
        last_progress = time.monotonic()
        try:
            while not self._stop_all:
                self.step(stop_requested=stop.is_set())
                if on_progress and time.monotonic() - last_progress >= progress_every_s:
                    last_progress = time.monotonic()
                    on_progress(self.summary())
            self.finish()
        finally:
            self.close()
        return self.summary()

    def step(self, poll_timeout_ms: int = 100, budget_s: float = 1.0,
             stop_requested: bool = False) -> int:
        """One lockstep iteration (collective); returns this rank's examples trained in it."""
        # While any rank has data, poll without waiting: a rank asleep in poll stalls everyone.
        self._poll(0 if self._busy else poll_timeout_ms)
        now = time.monotonic()
        c = self.cfg
        # A rank without partitions is idle whenever the others are (its base loop never is).
        idle = bool(c.idle_exit_s) and (not self.consumer.assignment()
                                         or now - self._last_input >= c.idle_exit_s)
        ckpt = self.rank == 0 and now - self._last_checkpoint >= c.checkpoint_interval_s
        snap = (self.rank == 0 and self.publisher is not None
                and now - self.publisher._last_snapshot >= c.snapshot_interval_s)
        ready, stop_n, idle_n, ckpt_n, snap_n = self._agree(
            [float(self.former.ready(now)), float(stop_requested), float(idle), float(ckpt), float(snap)])
        self._busy = ready > 0
        trained = self._train_global() if ready > 0 else 0
        if (snap_n > 0 or self._snapshot_due) and self.publisher is not None:
            self._snapshot()
        self._local_periodic()
        if ckpt_n > 0:
            self._last_checkpoint = now
            self.checkpoint()
        done = bool(c.max_examples) and self.global_examples >= c.max_examples
        self._stop_all = stop_n > 0 or idle_n >= self.world or done
        return trained

    def _agree(self, flags: list[float]) -> list[float]:
        return all_reduce_sum(flags) if self.world > 1 else flags

    def _train_global(self) -> int:
        """Trains one global step: this rank's next mini-batch, or an empty one."""
        due = self.former.pop_ready(time.monotonic(), flush=True, limit=1)
        mb = due[0] if due else MiniBatch(ExampleBatch.empty())
        if self.sl is None:
            self._create_learner(mb.batch)
        assert self.sl is not None and self.learner is not None
        dup_before = self.learner.times.duplicates
        before = self.sl.global_examples
        t0 = time.monotonic()
        n = self.sl.train(mb.batch)
        if self.sl.global_examples > before:
            self._last_step = time.monotonic()
            if not self._first_step:
                self._first_step = t0
        self.global_examples += self.sl.global_examples - before
        EXAMPLES.inc(n)
        DUPLICATES.inc(self.learner.times.duplicates - dup_before)
        WATERMARK.set(self.learner.watermark_ms)
        if n:
            self.batches += 1
        for key, off in mb.done_offsets.items():
            self.done_offsets[key] = max(self.done_offsets.get(key, 0), off)
        return n

    def _create_learner(self, batch: Any) -> None:
        """All ranks build the same model: slots from the config, or from the lowest rank with rows."""
        proposal = None
        if len(batch):
            slots = list(self.cfg.slots) if self.cfg.slots else sorted(batch.sparse)
            dense_dim = int(batch.dense.shape[1]) if batch.dense.ndim == 2 else 0
            proposal = {"slots": slots, "dense_dim": dense_dim}
        proposals = agree_json(proposal) if self.world > 1 else [proposal]
        chosen = next((p for p in proposals if p is not None), None)
        if chosen is None:
            raise RuntimeError("a global step started but no rank has rows")
        slots = tuple(chosen["slots"])
        if not slots:
            raise ValueError("no sparse slots configured and the first batch has none")
        self._attach(Learner(self.cfg, model_config_for(self.cfg, slots, int(chosen["dense_dim"])),
                             make_table(self.cfg, slots)))
        log.info("rank %d/%d: model slots %s, dense width %d", self.rank, self.world, slots,
                 chosen["dense_dim"])
        self._start_publisher()

    def _snapshot(self) -> None:
        assert self.publisher is not None and self.learner is not None
        self._snapshot_due = False
        self.publisher.publish_snapshot_collective(self.learner.watermark_ms)

    def _local_periodic(self) -> None:
        """Expiry and sparse/dense publishing: no collectives, each rank on its own clock."""
        if self.learner is None:
            return
        clock = self.learner.clock()
        if self.cfg.ttl_s > 0 and clock - self._last_expire >= self.cfg.expire_interval_s:
            self._last_expire = clock
            self.learner.table.expire(clock)
        if self.publisher is not None:
            try:
                self.publisher.maybe_publish(self.learner.watermark_ms, time.monotonic())
            except Exception as exc:  # broker down or slow: keep training, retry next time
                log.warning("publish to %s failed, will retry: %s", self.topics.params, exc)

    # -- checkpoint and stop (collective) --------------------------------------------------
    def checkpoint(self) -> None:
        """Every rank writes its shard, rank 0 the manifest; then each commits its own partitions."""
        offsets = dict(self.done_offsets)
        if self.learner is not None and self.sharded_ckpt is not None:
            self.sharded_manifest = self.sharded_ckpt.write(self.learner, offsets)
            offsets = self.sharded_manifest.offsets_by_partition()
            self.checkpoints += 1
            CHECKPOINTS.inc()
        elif self.sharded_ckpt is not None:
            return
        mine = {k: v for k, v in offsets.items() if k in self.consumer.assignment()}
        try:
            self.consumer.commit(mine)
        except KafkaError as exc:
            log.warning("offset commit failed (%s); will retry at the next checkpoint", exc)

    def finish(self) -> None:
        """Trains what any rank still holds (in lockstep), publishes, checkpoints: the clean stop."""
        while self._agree([float(self.former.pending_rows > 0 or len(self.former) > 0)])[0] > 0:
            self._train_global()
        if self.learner is not None and self.publisher is not None:
            try:
                if self.publisher.published_version >= 0:
                    self.publisher.publish_sparse(self.learner.watermark_ms)
                self.publisher.publish_dense(self.learner.watermark_ms)
            except Exception as exc:
                log.warning("final publish failed: %s", exc)
        # The learner exists on all ranks or on none, so these are collective on all or on none.
        self.checkpoint()
        if self.sl is not None:
            mine = self._exchange_stats()
            self.rank_stats = agree_json(mine) if self.world > 1 else [mine]

    def _exchange_stats(self) -> dict:
        assert self.sl is not None
        total = self.sl.compute_s + self.sl.timer.seconds
        return {"seconds": self.sl.timer.seconds, "calls": self.sl.timer.calls,
                "rows_sent": self.sl.timer.rows_sent, "compute_s": self.sl.compute_s,
                "steps": self.sl.steps, "share": self.sl.timer.seconds / total if total else 0.0}

    def summary(self) -> dict:
        """The one-process summary of this rank, plus global counts and the exchange's time split.

        ``exchange.seconds`` is time inside the exchange collectives (lookup ids, vectors,
        gradients, and the per-step count all-reduce), waiting for slower peers included;
        ``train_wall_s`` runs from the first to the last global step.
        """
        out = super().summary()
        wall = self._last_step - self._first_step
        out.update({"rank": self.rank, "world_size": self.world,
                    "global_examples_trained": self.global_examples, "train_wall_s": wall,
                    "global_examples_per_s": self.global_examples / wall if wall > 0 else 0.0})
        if self.sl is not None:
            out["exchange"] = self._exchange_stats()
        if self.rank_stats:
            out["exchange_by_rank"] = self.rank_stats
        return out
