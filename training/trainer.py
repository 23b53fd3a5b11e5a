"""The online trainer: ``hw.examples`` in a consumer group -> mini-batches -> learner -> ``hw.params``.

One thread, one loop: poll, decode, train every due mini-batch, publish what is due, checkpoint
what is due. Keeping publish and checkpoint on the training thread makes each of them a
consistent cut of the state without locks.

Crash safety: group offsets are committed only *after* a checkpoint holding the state that
covers them is durable, so the group's committed offsets never run ahead of the newest manifest.
On restart the trainer loads the checkpoint and drops records below the manifest's offsets
(those between the last commit and the manifest, if the crash fell in between).

Each example is learned once: examples the joiner emitted twice (it re-emits its uncommitted
step after a crash, with the same ids) are dropped by id by the de-dup filter
(:class:`training.dedup.SeenFilter`), which remembers the last ``dedup_capacity`` distinct ids
at least (its window) and is saved in, and restored from, every checkpoint, so the window spans
restarts. ``summary()["dedup"]`` and ``hw_train_duplicates_total`` report what it dropped and
whether it ever forgot an id (``forgotten`` > 0: a copy further back than the window would have
been trained again).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from paramsync import ensure_params_partitions
from streams.events import ExampleBatch, SchemaError, decode_examples, encode_examples
from streams.kafka_consumer import GroupConsumer
from streams.kafka_io import KafkaConfig, topic_names
from training.batching import BatchFormer, MiniBatch
from training.checkpoint import CheckpointManifest, CheckpointStore
from training.config import TrainerConfig
from training.learner import Learner
from training.two_tower.rows import TwoTowerRows
from training.model import tower_to_safetensors
from training.publish_guard import GuardConfig, PublishGuard, restore_last_good, screen_examples
from training.sync import DeltaPublisher, SyncConfig

log = logging.getLogger(__name__)

__all__ = ["OnlineTrainer"]

EXAMPLES = Counter("hw_train_examples", "examples trained")
DUPLICATES = Counter("hw_train_duplicates", "examples skipped as already trained")
BAD_MESSAGES = Counter("hw_train_bad_messages", "hw.examples messages that failed to decode")
CHECKPOINTS = Counter("hw_train_checkpoints", "checkpoints written")
WATERMARK = Gauge("hw_train_watermark_ms", "event time of the newest trained example")
COLD_START = Gauge("hw_train_cold_start", "1 while the cold-start hold keeps early rows back (ColdStartHold)")
TABLE_ROWS = Gauge("hw_train_table_rows", "live rows in the training table")


def _make_producer(kafka: KafkaConfig, max_bytes: int) -> Any:
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, client_id="hw-trainer-params",
                         acks="all", linger_ms=0, retries=kafka.retries,
                         max_request_size=max(max_bytes * 2, 1 << 20),
                         # See KafkaConfig.idempotence (a retried params message is harmless).
                         enable_idempotence=kafka.idempotence,
                         max_in_flight_requests_per_connection=1)


class OnlineTrainer:
    """Learns continuously from ``hw.examples``; see the module docstring for the guarantees."""

    def __init__(self, cfg: TrainerConfig, kafka: KafkaConfig) -> None:
        cfg.validate()
        # torch's optimizers import torch._dynamo when the first one is built (1.5-2.5 s on a
        # 2-core box): paid here, while the group join waits anyway, not by the first mini-batch.
        import torch._dynamo  # noqa: F401
        self.cfg, self.kafka = cfg, kafka
        self.topics = topic_names(kafka.topic_prefix)
        self.store = CheckpointStore(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.learner: Learner | None = None
        self.resume_offsets: dict[tuple[str, int], int] = {}
        self.done_offsets: dict[tuple[str, int], int] = {}
        self.manifest: CheckpointManifest | None = None
        self.checkpoints = 0
        self.bad_messages = 0
        self.batches = 0
        self.consume_s = self.decode_s = 0.0  # time in poll / in decoding (benchmark split)
        # The retrieval model beside the ranker: its vectors ship as rows of the same table.
        self.two_tower = (TwoTowerRows(cfg.two_tower_dim, cfg.two_tower_refresh_s, cfg.seed)
                          if cfg.two_tower else None)
        self._resume()
        # A short fetch wait: Tansu holds a fetch for the whole wait, which would add to every
        # example's way to serving.
        self.consumer = self._make_consumer()
        # One producer for hw.params and for bad input sent on to hw.dlq.
        self.producer = _make_producer(kafka, cfg.params_message_bytes)
        self.former = BatchFormer(cfg.batch_size, cfg.max_batch_wait_ms / 1000.0)
        self.publisher: DeltaPublisher | None = None
        # Checks every update before it is published (rules: training.publish_guard).
        self.guard = PublishGuard(GuardConfig.from_trainer(cfg),
                                  tower=lambda: self.learner.tower if self.learner else None,
                                  quality=lambda: self.learner.evaluator.overall.learner if self.learner else None,
                                  ) if cfg.guard and cfg.publish else None
        if self.learner is not None:
            self._start_publisher()
        now = time.monotonic()
        self._last_checkpoint = self._last_input = now
        self._last_expire = float("-inf")
        self._started = now
        self._paused = False

    # -- set-up ---------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.store is None:
            return
        manifest = self.store.latest()
        if manifest is None:
            return
        from embedding_store import EmbeddingTable

        table = EmbeddingTable.load(str(self.store.table_path_of(manifest)), device=self.cfg.device)  # its own
        tensors, meta = self.store.load_state(manifest)
        self.learner = Learner.restore(self.cfg, table, tensors, meta)
        if self.two_tower is not None:
            self.two_tower.load_state(tensors, meta)
        self.resume_offsets = manifest.offsets_by_partition()
        self.done_offsets = dict(self.resume_offsets)
        self.manifest = manifest
        dedup = self.learner.dedup
        log.info("resumed checkpoint %d: %d examples trained, offsets %s, table version %d, "
                 "de-dup filter %d ids (window %d, %d duplicates dropped so far)", manifest.seq,
                 manifest.examples_trained, manifest.offsets, int(table.version), len(dedup),
                 dedup.window, dedup.dropped)
        if int(table.version) > manifest.table_version:
            # Only a checkpoint of the older layout (one table saved in place) can be ahead of
            # its manifest: a crash between its table save and its manifest; replaying the
            # examples in between updates their rows a second time (training.checkpoint).
            log.warning("table version %d is ahead of checkpoint %d (table version %d): the "
                        "examples trained in between update their rows twice", int(table.version),
                        manifest.seq, manifest.table_version)

    def _make_consumer(self) -> Any:
        """The ``hw.examples`` consumer (a ``GroupConsumer``; the multi-rank trainer assigns partitions)."""
        return GroupConsumer(self.kafka, [self.topics.examples], self.cfg.group_id,
                             client_id="hw-trainer", fetch_max_wait_ms=self.cfg.fetch_max_wait_ms)

    def _sync_config(self) -> SyncConfig:
        """The publisher's settings, from the trainer's (one place for one and many ranks)."""
        c = self.cfg
        return SyncConfig(model_id=c.model_id, sparse_interval_s=c.sparse_sync_interval_s,
                          dense_interval_s=c.dense_sync_interval_s,
                          snapshot_interval_s=c.snapshot_interval_s, fp16=c.sync_fp16,
                          max_message_bytes=min(c.params_message_bytes, self.kafka.max_message_bytes),
                          num_param_shards=c.num_param_shards)

    def _start_publisher(self) -> None:
        if not self.cfg.publish:
            return
        assert self.learner is not None
        c = self.cfg
        sync = self._sync_config()
        if c.num_param_shards > 1:
            ensure_params_partitions(self.kafka.bootstrap_servers, self.topics.params, c.num_param_shards)
        learner = self.learner
        self.publisher = DeltaPublisher(
            self.producer, self.topics.params, learner.table,
            lambda: tower_to_safetensors(learner.tower, {"examples_trained": str(learner.examples_trained)}),
            sync, guard=self.guard)

    # -- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None,
            on_progress: Callable[[dict], None] | None = None, progress_every_s: float = 1.0) -> dict:
        """Trains until ``stop`` is set, ``max_examples`` is reached or input idles out."""
        stop = stop or threading.Event()
        last_progress = time.monotonic()
        try:
            while not stop.is_set() and not self._finished():
                self.step()
                if on_progress and time.monotonic() - last_progress >= progress_every_s:
                    last_progress = time.monotonic()
                    on_progress(self.summary())
            self.finish()
        finally:
            self.close()
        return self.summary()

    def _finished(self) -> bool:
        c = self.cfg
        trained = self.learner.examples_trained if self.learner else 0
        if c.max_examples and trained >= c.max_examples:
            return True
        return bool(c.idle_exit_s) and time.monotonic() - self._last_input >= c.idle_exit_s

    def step(self, poll_timeout_ms: int = 100, budget_s: float = 1.0) -> int:
        """One loop iteration; returns the number of examples trained in it.

        Kafka drops a member that does not poll within ``max_poll_interval_ms``, so one step
        trains for at most ``budget_s`` and fetching pauses while a backlog of more than eight
        mini-batches is pending: the loop keeps polling (and its membership) however slow a
        step is, and memory for pending rows stays bounded. (Pausing drops the client's
        prefetched data, hence a high-water mark well above one batch.)
        """
        self._poll(poll_timeout_ms)
        trained = 0
        deadline = time.perf_counter() + budget_s
        while time.perf_counter() < deadline:
            self.former.warm_up(self.cfg, self.learner.examples_trained if self.learner else 0)
            due = self.former.pop_ready(time.monotonic(), limit=1)
            if not due:
                break
            trained += self._train(due[0])
        self._periodic()
        return trained

    def _poll(self, poll_timeout_ms: int) -> None:
        """Polls once and queues what arrived in the batch former (the multi-rank loop reuses it)."""
        self._set_paused(self.former.pending_rows >= 8 * self.cfg.batch_size)
        t0 = time.perf_counter()
        # Never sleep in poll past the moment a partial mini-batch becomes due.
        timeout = int(min(poll_timeout_ms, self.former.wait_s(time.monotonic()) * 1000))
        records = self.consumer.poll(timeout_ms=timeout, max_records=4)
        t1 = time.perf_counter()
        now = time.monotonic()
        if not records and not self.consumer.assignment():
            # Joining or re-joining the group (slow on Tansu) is not idleness.
            self._last_input = now
        if self.former.pending_rows:
            self._last_input = now
        for r in records:
            if r.offset < self.resume_offsets.get((r.topic, r.partition), 0):
                continue  # already inside the checkpoint we resumed from
            self._last_input = now
            try:
                batch = decode_examples(r.value)
            except SchemaError as exc:
                self._bad(r, exc)
                batch = ExampleBatch.empty()
            batch, refused = screen_examples(batch, f"{r.topic}[{r.partition}]@{r.offset}")
            if refused is not None and self.producer is not None:
                self.producer.send(self.topics.dlq, value=encode_examples(refused), key=b"trainer")
            self.former.add(batch, r.topic, r.partition, r.offset, now)
        self.consume_s += t1 - t0
        self.decode_s += time.perf_counter() - t1

    def _set_paused(self, paused: bool) -> None:
        """Pauses/resumes fetching on the assigned partitions (polls still keep membership)."""
        if paused == self._paused:
            return
        if paused:
            self.consumer.pause()
        else:
            self.consumer.resume()
        self._paused = paused

    def _train(self, mb: MiniBatch) -> int:
        n = 0
        if len(mb):
            if self.learner is None:
                self.learner = Learner.for_batch(self.cfg, mb.batch)
                log.info("model slots %s, dense width %d", self.learner.model_cfg.slots,
                         self.learner.model_cfg.dense_dim)
                self._start_publisher()
            dup_before = self.learner.times.duplicates
            n = self.learner.train(mb.batch)
            if self.two_tower is not None:
                self.two_tower.step(mb.batch, self.learner.table)
            EXAMPLES.inc(n)
            DUPLICATES.inc(self.learner.times.duplicates - dup_before)
            WATERMARK.set(self.learner.trained_watermark_ms)
            COLD_START.set(self.learner.cold_starting)
            self.batches += 1
        for key, off in mb.done_offsets.items():
            self.done_offsets[key] = max(self.done_offsets.get(key, 0), off)
        return n

    def _bad(self, record: Any, exc: Exception) -> None:
        self.bad_messages += 1
        BAD_MESSAGES.inc()
        log.warning("skipping undecodable example message %s[%d]@%d: %s", record.topic,
                    record.partition, record.offset, exc)
        if self.producer is not None:
            self.producer.send(self.topics.dlq, value=record.value, key=b"trainer")

    def _periodic(self) -> None:
        now = time.monotonic()
        if self.learner is None:
            return
        # Expiry runs on the TTL's own clock: when event time races ahead (catching up on a
        # backlog) it runs every step, so live rows never exceed ~ttl_s of the stream.
        clock = self.learner.clock()
        if self.cfg.ttl_s > 0 and clock - self._last_expire >= self.cfg.expire_interval_s:
            self._last_expire = clock
            self.learner.table.expire(clock)
            if self.publisher is None:  # no replica needs the deletion records
                self.learner.table.compact_deletions(int(self.learner.table.version))
        if self.publisher is not None:
            try:
                self.publisher.maybe_publish(self.learner.trained_watermark_ms, now)
            except Exception as exc:  # the broker is down or slow: keep training, retry next time
                log.warning("publish to %s failed, will retry: %s", self.topics.params, exc)
            if self.publisher.rollback_due:
                self._rollback()
        if now - self._last_checkpoint >= self.cfg.checkpoint_interval_s:
            self._last_checkpoint = now
            self.checkpoint()

    def _rollback(self) -> None:
        """The publish guard gave up on the current state: back to the newest checkpoint, keeping
        the place in hw.examples (``training.publish_guard``, rule 4)."""
        assert self.guard is not None and self.publisher is not None
        try:
            learner = restore_last_good(self.cfg, self.store, self.publisher.published_version)
        except (OSError, ValueError) as exc:  # a corrupt checkpoint: nothing good to go back to
            learner, detail = None, f"checkpoint unusable: {exc}"
        else:
            detail = "no checkpoint to go back to (set --checkpoint-dir)"
        if learner is None:
            self.guard.rolled_back(False, detail)
            return
        self.learner = learner
        self._start_publisher()  # a fresh publisher: its first publish is a snapshot
        self.guard.rolled_back(True)

    def request_dense(self) -> None:
        """Publish the dense tower at the next step instead of waiting for its interval."""
        if self.publisher is not None:
            self.publisher.request_dense()

    def checkpoint(self) -> None:
        """Persists state (when a directory is configured), then commits the offsets it covers."""
        offsets = dict(self.done_offsets)
        memory = getattr(self.learner, "early_memory", None)
        if memory is not None:  # FNW needs each copy to meet its negative's input
            log.info("early copies: %d met their negative's input, %d did not", memory.hits, memory.misses)
        if self.store is not None and self.learner is not None:
            if self.publisher is not None and not self.publisher.state_is_good():
                log.warning("checkpoint skipped: the publish guard holds the current state back")
                return
            tensors, meta = self.learner.state()
            if self.two_tower is not None:
                tt_tensors, tt_meta = self.two_tower.state()
                tensors, meta = {**tensors, **tt_tensors}, {**meta, **tt_meta}
            self.manifest = self.store.write(
                self.learner.table, tensors, meta, offsets, int(self.learner.table.version),
                self.learner.examples_trained, self.learner.watermark_ms)
            self.checkpoints += 1
            CHECKPOINTS.inc()
        elif self.store is not None:
            return  # nothing trained yet: no state to cover any offset
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:
            # Out of the group for a moment (rebalance): the checkpoint holds the offsets, and
            # the next checkpoint commits again; replays in between are filtered or de-duplicated.
            log.warning("offset commit failed (%s); will retry at the next checkpoint", exc)

    def finish(self) -> None:
        """Trains what is pending, publishes everything, checkpoints: the clean-stop path."""
        for mb in self.former.pop_ready(time.monotonic(), flush=True):
            self._train(mb)
        if self.learner is not None and self.publisher is not None:
            try:
                self.publisher.publish_sparse(self.learner.trained_watermark_ms)
                self.publisher.publish_dense(self.learner.trained_watermark_ms)
            except Exception as exc:
                log.warning("final publish failed: %s", exc)
        self.checkpoint()

    def close(self) -> None:
        self.consumer.close()
        if self.producer is not None:
            self.producer.close(timeout=10)

    def summary(self) -> dict:
        """JSON-ready progress: counts, throughput, prequential figures, sync and checkpoint state."""
        ln = self.learner
        elapsed = max(time.monotonic() - self._started, 1e-9)
        out: dict[str, Any] = {
            "examples_trained": ln.examples_trained if ln else 0,
            "duplicates_skipped": ln.times.duplicates if ln else 0,
            "bad_messages": self.bad_messages, "batches": self.batches,
            "examples_per_s": (ln.times.examples / elapsed) if ln else 0.0,
            "watermark_ms": ln.watermark_ms if ln else -1,
            "trained_watermark_ms": ln.trained_watermark_ms if ln else -1,
            "table_version": int(ln.table.version) if ln else 0,
            "published_version": self.publisher.published_version if self.publisher else -1,
            "checkpoints": self.checkpoints,
            **({"guard": self.guard.summary()} if getattr(self.publisher, "guard", None) else {}),
            "offsets": CheckpointManifest.offsets_key(self.done_offsets),
        }
        if ln is not None:
            stats = ln.table.stats()
            out["table_rows"] = int(sum(s["live_rows"] for s in stats.values()))
            out["table_bytes"] = int(sum(s["bytes_used"] for s in stats.values()))
            TABLE_ROWS.set(out["table_rows"])
            out["eval"] = {k: v for k, v in ln.evaluator.summary().items() if k != "windows"}
            out["dedup"] = {"ids": len(ln.dedup), "window": ln.dedup.window,
                            "dropped": ln.dedup.dropped, "forgotten": ln.dedup.forgotten}
            out["times"] = {"consume_s": self.consume_s, "decode_s": self.decode_s,
                            **ln.times.as_dict()}
        return out
