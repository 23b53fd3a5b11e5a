"""One training step on one mini-batch: de-dup, score (prequential), backprop, sparse + dense update.

:class:`Learner` owns the state that a checkpoint must capture: the embedding table, the dense
tower with its Adam optimizer, the de-dup filter and the evaluator. It knows nothing of Kafka,
which keeps it usable from the benchmark, the tests and the online loop alike.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from training.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from training.config import TrainerConfig
from training.counting import decayed_counts, example_increments
from training.dedup import SeenFilter
from training.delayed_feedback import (ColdStartHold, EarlyFeatureMemory, early_increments,
                                       early_weights, start_counts)
from training.early_labels import EarlyLabels
from training.evaluation import PrequentialEvaluator
from training.model import (with_cross_bags, DenseTower, ModelConfig, bag_grads_to_ids, bf16_supported,
                            init_bias_for_ctr, lookup_slots, resolve_device, weighted_bce)

log = logging.getLogger(__name__)

__all__ = ["StepTimes", "Learner", "make_table", "model_config_for", "model_slots"]


@dataclass
class StepTimes:
    """Seconds spent per phase, accumulated over steps (the benchmark's time split)."""

    dedup: float = 0.0
    lookup: float = 0.0
    forward_backward: float = 0.0
    update: float = 0.0
    examples: int = 0
    duplicates: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"dedup_s": self.dedup, "lookup_s": self.lookup,
                "forward_backward_s": self.forward_backward, "update_s": self.update}


def model_slots(cfg: TrainerConfig, data_slots: tuple[str, ...]) -> tuple[str, ...]:
    """The model's slots: the data's, then the configured crosses of them."""
    return tuple(data_slots) + tuple(c for c in cfg.crosses if c not in data_slots)


def model_config_for(cfg: TrainerConfig, slots: tuple[str, ...], dense_dim: int) -> ModelConfig:
    """The model the trainer builds over ``slots``: its ModelFields, the data's shape."""
    return cfg.model_config(slots, dense_dim)


def make_table(cfg: TrainerConfig, slots: tuple[str, ...]) -> Any:
    """A fresh ``EmbeddingTable`` with one slot config per model slot, from the trainer config,
    on ``cfg.device`` (on CUDA its reads and Adagrad updates run the Triton kernels)."""
    from embedding_store import EmbeddingTable, SlotConfig

    ttl = cfg.ttl_s if cfg.ttl_s > 0 else None
    return EmbeddingTable([SlotConfig(name=s, dim=cfg.embedding_dim, optimizer=cfg.sparse_optimizer,
                                      lr=cfg.sparse_lr, init_std=cfg.init_std, ttl_s=ttl,
                                      admit_threshold=cfg.admit_threshold,
                                      counter_columns=2 if cfg.counters else 0) for s in slots],
                          device=resolve_device(cfg.device), seed=cfg.seed)


@dataclass
class Learner:
    """Table + tower + optimizers + de-dup + evaluator; :meth:`train` does one prequential step."""

    cfg: TrainerConfig
    model_cfg: ModelConfig
    table: Any
    tower: DenseTower = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    dedup: SeenFilter = field(init=False)
    evaluator: PrequentialEvaluator = field(init=False)
    early_labels: EarlyLabels | None = field(init=False)  # None: every row scored as given
    times: StepTimes = field(default_factory=StepTimes)
    examples_trained: int = 0
    watermark_ms: int = -1  # event time of the newest row received (the stream's clock)
    trained_watermark_ms: int = -1  # of the newest row trained: what a publish carries (held rows lag)
    nonfinite_batches: int = 0  # batches skipped because their loss was not finite
    _bias_set: bool = False
    _bias_settled: bool = False  # the start rate is final (early streams: labels final)
    _start_logit: float = 0.0
    _settle_ms: int = 0
    _start: tuple[float, float] = (0.0, 0.0)  # positives, impressions before the bias was set
    early_memory: EarlyFeatureMemory | None = None  # made at the first early batch
    cold_hold: ColdStartHold | None = field(init=False)  # None once warm (or restored)
    cold_hold_stats: dict | None = None  # the hold's summary, once it is done
    last_trained: Any = None  # the rows the last step trained (after de-dup and the hold)
    bf16: bool = field(init=False)
    device: torch.device = field(init=False)  # cfg.device: the table's, the tower's, Adam's

    def __post_init__(self) -> None:
        self.device = resolve_device(self.cfg.device)
        if torch.device(getattr(self.table, "device", self.device)) != self.device:
            raise ValueError(f"the table is on {self.table.device}, the config says {self.device}")
        prec = self.cfg.dense_precision
        native = torch.cuda.is_bf16_supported() if self.device.type == "cuda" else bf16_supported()
        self.bf16 = prec == "bf16" or (prec == "auto" and native)
        torch.manual_seed(self.cfg.seed)
        # Built on the CPU, then moved: one seed gives the same weights on every device.
        self.tower = DenseTower(self.model_cfg).to(self.device)
        self.optimizer = torch.optim.Adam(self.tower.parameters(), lr=self.cfg.dense_lr)
        self.dedup = SeenFilter(self.cfg.dedup_capacity, generations=2)
        self.evaluator = PrequentialEvaluator(self.cfg.eval_window)
        self.early_labels = EarlyLabels(int(self.cfg.early_label_wait_s * 1000))
        self.cold_hold = (ColdStartHold(int(self.cfg.early_label_wait_s * 1000),
                                        self.cfg.early_warmup_examples)
                          if self.cfg.early_warmup_examples > 0 else None)

    @classmethod
    def for_batch(cls, cfg: TrainerConfig, batch: Any, table: Any | None = None) -> "Learner":
        """Builds a learner whose slots/dense width come from ``cfg`` or, if unset, from ``batch``."""
        slots = model_slots(cfg, tuple(cfg.slots) if cfg.slots else tuple(sorted(batch.sparse)))
        if not slots:
            raise ValueError("no sparse slots configured and the first batch has none")
        dense_dim = int(batch.dense.shape[1]) if batch.dense.ndim == 2 else 0
        return cls(cfg, model_config_for(cfg, slots, dense_dim),
                   table if table is not None else make_table(cfg, slots))

    def drop_seen(self, batch: Any) -> Any:
        """``batch`` without the examples already trained (same example id), counted as duplicates."""
        keep = self.dedup.filter_new(batch.example_id)
        dup = len(keep) - int(keep.sum())
        if not dup:
            return batch
        self.times.duplicates += dup
        return batch.take(keep)

    def train(self, batch: Any, now: float | None = None) -> int:
        """One prequential step; returns the number of examples trained (after de-dup)."""
        holding, given = self.cold_hold is not None, len(batch)
        batch = self.rows_due(batch)
        if len(batch) == 0:
            return 0
        if holding:
            return self._train_rows(batch, now, step_rows=given)
        self.last_trained = batch
        return self._step(batch, now, time.perf_counter())

    def rows_due(self, batch: Any) -> Any:
        """``batch`` past de-dup and the cold-start hold: the rows to train now, oldest first
        (a release of held rows can be many batches' worth). The multi-rank learner shares it."""
        t0 = time.perf_counter()
        batch = self.drop_seen(batch)
        self.times.dedup += time.perf_counter() - t0
        if len(batch) == 0:
            return batch
        if len(batch.event_time_ms):
            self.watermark_ms = max(self.watermark_ms, int(batch.event_time_ms.max()))
        if self.cold_hold is not None:  # a fresh learner's first stretch: labels final first
            batch = self.cold_hold.apply(batch, self.watermark_ms)
            if self.cold_hold.done:
                self.cold_hold_stats, self.cold_hold = self.cold_hold.summary(), None
        return batch

    @property
    def cold_starting(self) -> bool:
        """True while the cold-start hold keeps early rows back (they train a label wait late)."""
        return self.cold_hold is not None and not self.cold_hold.warm and self.cold_hold.held > 0

    def _train_rows(self, batch: Any, now: float | None, step_rows: int = 0) -> int:
        """Trains ``batch`` in steps of at most ``batch_size`` rows, or ``step_rows`` (the
        caller's batch: a batch the hold passes untouched is one step, as without the hold; a
        release of held rows can be many batches' worth)."""
        self.last_trained = batch
        size = max(self.cfg.batch_size, step_rows)
        if len(batch) <= size:
            return self._step(batch, now, time.perf_counter())
        return sum(self._step(batch.take(np.arange(i, min(len(batch), i + size))), now,
                              time.perf_counter()) for i in range(0, len(batch), size))

    def _step(self, batch: Any, now: float | None, t1: float) -> int:
        """Trains ``batch`` (de-duplicated, past the hold) as one step."""
        n = len(batch)
        now = self.clock() if now is None else now
        mc = self.model_cfg
        if mc.crosses:
            batch = replace(batch, sparse=with_cross_bags(batch.sparse, mc.crosses, n))
        poolings = mc.slot_poolings()
        bags = lookup_slots(self.table, mc.slots, batch.sparse, n, poolings, train=True, now=now)
        counter_deltas: list[torch.Tensor | None] = []
        if mc.counters:
            counter_deltas = self._in_batch_counts(bags.emb, batch, poolings)
        t2 = time.perf_counter()
        host_labels = torch.from_numpy(np.ascontiguousarray(batch.label, np.float32))
        host_rates = torch.from_numpy(np.ascontiguousarray(batch.sample_rate, np.float32))
        emit = getattr(batch, "emit", None)
        if emit is not None and np.any(emit) and self.cfg.early_memory_rows > 0:
            self._same_x(bags.emb, batch, emit)
        if not self._bias_settled:  # the head starts at the stream's click rate
            self._start_rate(host_labels, host_rates, emit, batch.event_time_ms)
        # The step's tensors on the device; on the CPU .to() returns the tensor itself (no copy).
        labels, rates = host_labels.to(self.device), host_rates.to(self.device)
        dense = (torch.from_numpy(np.ascontiguousarray(batch.dense, np.float32)).to(self.device)
                 if mc.dense_dim else None)
        logits = self.logits(bags.emb, dense)
        loss = weighted_bce(logits, labels, rates,  # FNW on early-emitted rows
                            early_weights(logits, labels, emit, self.cfg.early_correction))
        if not bool(torch.isfinite(loss)):
            # A poisoned state (NaN/inf weights) must not spread into the rows or crash the
            # loop; the publish guard sees the state and rolls back (training.publish_guard).
            self.nonfinite_batches += 1
            if self.nonfinite_batches & (self.nonfinite_batches - 1) == 0:  # 1, 2, 4, 8, ...
                log.error("non-finite loss: batch of %d examples not trained (%d such batches)",
                          n, self.nonfinite_batches)
            return 0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        t3 = time.perf_counter()
        # Scored before this batch's update: the prequential (test-then-train) figure; an early
        # stream's rows on their final labels (training.early_labels).
        self.score_rows(logits.detach().cpu().numpy(), batch)
        grad = bags.emb.grad
        for s, slot in enumerate(mc.slots):
            if len(bags.ids[s]) == 0:
                continue
            per_id = bag_grads_to_ids(grad[:, s], bags.lengths[s].to(grad.device), poolings[s])
            if counter_deltas:  # counters take what the batch adds to them, not a gradient
                per_id[:, -2:] = counter_deltas[s]
            self.table.apply_gradients(slot, bags.ids[s], per_id, now=now)
        t4 = time.perf_counter()
        self.times.lookup += t2 - t1
        self.times.forward_backward += t3 - t2
        self.times.update += t4 - t3
        self.times.examples += n
        self.times.steps += 1
        self.examples_trained += n
        if len(batch.event_time_ms):
            self.trained_watermark_ms = max(self.trained_watermark_ms, int(batch.event_time_ms.max()))
        return n

    def flush(self, now: float | None = None) -> int:
        """Trains the rows the cold-start hold still keeps, on the labels known now (a stream
        that ends); returns how many."""
        if self.cold_hold is None:
            return 0
        held = self.cold_hold.drain()
        self.cold_hold_stats, self.cold_hold = self.cold_hold.summary(), None
        return self._train_rows(held, now) if len(held) else 0

    def score_rows(self, logits: np.ndarray, batch: Any) -> None:
        """Hands a trained batch's pre-update scores to the evaluator (an early stream's rows on
        their final labels, :mod:`training.early_labels`)."""
        if self.early_labels is None:  # the caller scores rows itself (training.prequential)
            self.evaluator.update(logits, batch.label, batch.sample_rate, batch.truth_p)
            return
        scored = self.early_labels.route(logits, batch.label, batch.sample_rate, batch.truth_p,
                                         batch.example_id, batch.event_time_ms,
                                         getattr(batch, "emit", None))
        if len(scored):
            self.evaluator.update(scored.logits, scored.labels, scored.sample_rate, scored.truth_p)

    def _in_batch_counts(self, emb: torch.Tensor, batch: Any,
                         poolings: tuple[str, ...]) -> list[torch.Tensor | None]:
        """Sets each row's counter columns to what its ids had seen when it was scored (the
        table's counts, decayed and added to by the ids' earlier examples in this batch; see
        :mod:`training.counting`); returns per slot the per-id additions for the table."""
        mc = self.model_cfg
        emit = getattr(batch, "emit", None)
        increments = early_increments(example_increments(batch.label, batch.sample_rate),
                                      batch.label, emit)
        deltas: list[torch.Tensor | None] = []
        with torch.no_grad():
            for s, slot in enumerate(mc.slots):
                bag = batch.sparse.get(slot)
                if bag is None or len(bag.values) == 0:
                    deltas.append(None)
                    continue
                values = np.asarray(bag.values, np.int64)
                before = self.table.lookup(slot, torch.from_numpy(values))[:, -2:].cpu().numpy()
                pooled, delta = decayed_counts(values, np.asarray(bag.lengths), batch.event_time_ms,
                                               increments, before.astype(np.float64),
                                               self.cfg.count_decay, mean=poolings[s] == "mean")
                emb[:, s, -2:] = torch.from_numpy(pooled)
                deltas.append(torch.from_numpy(delta))
        return deltas

    def _start_rate(self, labels: torch.Tensor, rates: torch.Tensor, emit: np.ndarray | None,
                    event_time_ms: np.ndarray) -> None:
        """Starts the head's bias (and the counters' prior) at the stream's click rate.

        A windowed stream's first batch gives it. On an early stream the first batches lack the
        clicks still to come, so the rate is re-taken from everything seen, and bias and prior
        moved by the change, until event time is ``early_label_wait_s`` past the first row (its
        labels final): set once at the first copy it sat far below the true rate, and Adam's
        small steps did not bring it back (live demo: logloss above 1 for the first windows).
        """
        pos, imps, early = start_counts(labels, rates, emit)
        self.start_bias(pos, imps, early, int(event_time_ms.min()), int(event_time_ms.max()))

    def start_bias(self, positives: float, impressions: float, early: bool, first_ms: int,
                   last_ms: int) -> None:
        """:meth:`_start_rate` on a step's counts (:func:`start_counts`) and event-time span; the
        multi-rank learner passes its global batch's, so every rank moves its tower alike."""
        self._start = (self._start[0] + positives, self._start[1] + impressions)
        if early and self._start[0] <= 0:
            return  # no click yet: nothing to start from
        ctr = min(max(self._start[0] / max(self._start[1], 1e-12), 1e-4), 1 - 1e-4)
        now = math.log(ctr / (1 - ctr))
        if not self._bias_set:
            init_bias_for_ctr(self.tower, ctr)
            self._bias_set, self._start_logit = True, now
            self._settle_ms = first_ms + int(self.cfg.early_label_wait_s * 1000)
        else:
            with torch.no_grad():
                self.tower.head.bias.add_(now - self._start_logit)
                if self.model_cfg.counters:
                    self.tower.prior_logit.add_(now - self._start_logit)
            self._start_logit = now
        if not early or last_ms >= self._settle_ms:
            self._bias_settled = True

    def _same_x(self, emb: torch.Tensor, batch: Any, emit: np.ndarray) -> None:
        """Gives each positive copy the tower input its negative was trained with (FNW needs
        the same x; see :mod:`training.delayed_feedback`)."""
        if self.early_memory is None:
            self.early_memory = EarlyFeatureMemory(self.cfg.early_memory_rows, emb.shape[1],
                                                   emb.shape[2], 2 if self.model_cfg.counters else 0)
        with torch.no_grad():
            same = self.early_memory.apply(emb.detach().cpu().numpy(), batch.example_id, batch.label, emit)
            if same is not None:
                emb.copy_(torch.from_numpy(same))

    def logits(self, emb: torch.Tensor, dense: torch.Tensor | None,
               tower: torch.nn.Module | None = None) -> torch.Tensor:
        """float32[B] logits of ``tower`` (default: this learner's; the multi-rank learner passes
        its DDP wrapper) in the configured precision.

        bf16 autocast runs the tower's matmuls ~1.8x faster on CPUs with bf16 dot products, at
        the same prequential AUC on the demo world (AUC gap to the truth after 300k events, seeds
        0/1: 0.0124/0.0183 against fp32's 0.0120/0.0187); parameters, their gradients and Adam
        stay fp32, the loss is taken in fp32.
        """
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = (self.tower if tower is None else tower)(emb, dense)
        return out.float()

    def clock(self) -> float:
        """The time rows are stamped with and expired by (seconds).

        ``ttl_clock="event"``: the newest example's event time, so a trainer catching up on a
        backlog, or replaying history, keeps exactly the rows seen in the last ``ttl_s`` of the
        *stream* (wall-clock TTL would keep a whole burst alive). Falls back to the wall clock
        until examples carry event times.
        """
        if self.cfg.ttl_clock == "event" and self.watermark_ms > 0:
            return self.watermark_ms / 1000.0
        return time.time()

    # -- checkpoint state (everything but the table, which persists itself) ---------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"tower.{k}": v for k, v in self.tower.state_dict().items()}
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        tensors.update(opt_tensors)
        for k, v in {**self.dedup.state(), **self.evaluator.state()}.items():
            tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
        meta = {"model_config": self.model_cfg.to_json(), "optimizer": opt_meta,
                "learner": json.dumps({"examples_trained": self.examples_trained,
                                       "watermark_ms": self.watermark_ms})}
        if self.cold_hold is not None:  # still warming up: the held rows are part of the state
            rows, info = self.cold_hold.state()
            tensors["cold_hold.rows"] = torch.frombuffer(bytearray(rows), dtype=torch.uint8)
            meta["cold_hold"] = json.dumps(info)
        return tensors, meta

    @classmethod
    def restore(cls, cfg: TrainerConfig, table: Any, tensors: dict[str, torch.Tensor],
                meta: dict[str, str]) -> "Learner":
        learner = cls(cfg, ModelConfig.from_json(meta["model_config"]), table)
        learner.tower.load_state_dict({k[len("tower."):]: v for k, v in tensors.items()
                                       if k.startswith("tower.")})
        optimizer_from_tensors(learner.optimizer, tensors, meta["optimizer"])
        arrays = {k: v.numpy() for k, v in tensors.items()}
        learner.dedup.load_state({k: v for k, v in arrays.items() if k.startswith("dedup.")})
        learner.evaluator.load_state({k: v for k, v in arrays.items() if k.startswith("eval.")})
        info = json.loads(meta["learner"])
        learner.examples_trained = int(info["examples_trained"])
        learner.watermark_ms = learner.trained_watermark_ms = int(info["watermark_ms"])
        learner._bias_set = learner._bias_settled = True
        learner.cold_hold = None  # a restored learner is warm, unless it was still warming up:
        if "cold_hold" in meta:
            learner.cold_hold = ColdStartHold.from_state(
                tensors["cold_hold.rows"].numpy().tobytes(), json.loads(meta["cold_hold"]))
            # (nothing trained yet: the bias still starts at the first rows' click rate)
            learner._bias_set = learner._bias_settled = learner.examples_trained > 0
        return learner
