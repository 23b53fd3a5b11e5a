"""One lockstep training step on one rank: sharded sparse half, data-parallel (DDP) dense tower.

:class:`ShardedLearner` wraps an ordinary :class:`training.learner.Learner` -- its table holds
only this rank's shard; its tower, Adam optimizer, de-dup filter and evaluator are used as they
are -- and replaces the lookup and the loss scaling:

- the loss of a global batch is ``sum(w * bce) / sum(w)`` over *all* ranks' rows. Each rank
  computes ``world * sum_r(w * bce) / W`` with ``W`` all-reduced, so DDP's gradient *average*
  is exactly the one-process gradient of the dense tower;
- the pooled-bag gradient on rank r is therefore ``world`` times its share of the global
  gradient; it is divided by ``world`` before it travels to the owners, who sum the shares.

An early-emitted stream (:mod:`training.delayed_feedback`) is trained as the one-process
learner trains it, with the learner's own pieces: FNW weights on early rows
(``early_correction``), the copy's feature memory, the head's start at the click rate of the
*global* batches (so every rank moves its tower alike), and the cold-start hold
(``early_warmup_examples``). Early rows first go to the rank that owns their impression
(:func:`training.distributed.early.route_early`), so a copy meets its negative. Each rank holds
its own rows; warmth is global: the ranks sum the rows they trained on final labels, and every
rank's hold counts that sum, so all turn warm in the same call.

Lockstep: every rank calls :meth:`train` once per poll, with an empty batch when it has no
rows: the collectives inside need every rank. Without a hold that is one global step (skipped
by all when no rank has a row). While any rank's hold is open, a call can release many
batches' worth on one rank and nothing on another, so the ranks all-reduce (max) the number of
``batch_size`` steps each needs and all train that many, a rank that runs out with empty
steps; at one rank this is exactly :meth:`Learner.train`'s split.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from streams.events import ExampleBatch
from training.delayed_feedback import early_weights, start_counts
from training.distributed.early import route_early, steps_of
from training.distributed.exchange import ExchangeTimer, all_reduce_max, all_reduce_sum
from training.distributed.sharded import ShardedEmbedding
from training.learner import Learner

log = logging.getLogger(__name__)

__all__ = ["ShardedLearner"]


class ShardedLearner:
    """A :class:`Learner` whose table is one shard and whose tower trains under DDP.

    Constructed on every rank together (DDP's broadcast, and the ranks agree on the restored
    start-bias and warm-up state)."""

    def __init__(self, learner: Learner, rank: int, world_size: int) -> None:
        if learner.model_cfg.counters:
            raise ValueError("multi-rank training does not support per-id counters (counters=false)")
        if learner.device.type != "cpu":  # the shard exchange and gloo run on host tensors
            raise ValueError(f"multi-rank training runs on the CPU, not {learner.device} (device=cpu)")
        self.learner = learner
        self.rank, self.world = rank, world_size
        self.timer = ExchangeTimer()
        mc = learner.model_cfg
        self.sparse = ShardedEmbedding(learner.table, mc.slots, rank, world_size, mc.pooling,
                                       self.timer)
        self.tower: nn.Module = learner.tower
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's weights now: every rank starts from the same tower.
            self.tower = DistributedDataParallel(learner.tower)
        hold = learner.cold_hold
        # A restored rank may have trained nothing yet (its bias unset) while others have: the
        # towers are equal, so the bias is set if any rank's is; a hold is open if any rank's is.
        settled, final, open_ = self._max([float(learner._bias_settled),
                                           float(hold.final_trained if hold else 0),
                                           float(hold is not None)])
        if settled:
            learner._bias_set = learner._bias_settled = True
        self._final_trained = int(final)  # rows trained on final labels, all ranks together
        self._hold_open = open_ > 0
        if hold is not None:
            hold.final_trained = self._final_trained
        self.global_examples = 0
        self.steps = 0
        self.compute_s = 0.0  # time in train() outside the exchange collectives

    @property
    def table(self) -> Any:
        return self.learner.table

    def _timed(self, reduce: Any, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t0 = time.perf_counter()
        out = reduce(values)
        self.timer.seconds += time.perf_counter() - t0  # waiting here is waiting for peers, too
        return out

    def _global(self, values: list[float]) -> list[float]:
        return self._timed(all_reduce_sum, values)

    def _max(self, values: list[float]) -> list[float]:
        return self._timed(all_reduce_max, values)

    def train(self, batch: Any, now: float | None = None) -> int:
        """Trains what ``batch`` makes due, in global steps (every rank must call it); returns
        this rank's examples trained."""
        t_start, x_start = time.perf_counter(), self.timer.seconds
        ln = self.learner
        if self.world > 1:  # (its time is exchange time; ``timer.calls`` counts the lookup's)
            batch = route_early(batch, self.rank, self.world)
            self.timer.seconds += time.perf_counter() - t_start
        hold = ln.cold_hold
        final_before = hold.final_trained if hold is not None else 0
        rows = ln.rows_due(batch)
        if len(rows):
            ln.last_trained = rows
        steps = (steps_of(rows, ln.cfg.batch_size) if hold is not None
                 else [rows] if len(rows) else [])
        count = len(steps) if hold is not None else 1
        if self._hold_open:
            gained = (hold.final_trained - final_before) if hold is not None else 0
            count = self._agree_hold(len(steps), gained)
        n = self._run(steps, count, now)
        self.compute_s += (time.perf_counter() - t_start) - (self.timer.seconds - x_start)
        return n

    def _agree_hold(self, steps: int, gained: int) -> int:
        """The number of global steps of this call (the most any rank needs), and the global
        count of rows trained on final labels, handed to every open hold."""
        mine = [0.0] * self.world  # one slot per rank: the max of the vector is every rank's gain
        mine[self.rank] = float(gained)
        out = self._max([float(steps), float(self.learner.cold_hold is not None), *mine])
        self._final_trained += int(sum(out[2:]))
        if self.learner.cold_hold is not None:
            self.learner.cold_hold.final_trained = self._final_trained
        self._hold_open = out[1] > 0
        return int(out[0])

    def _run(self, steps: list[ExampleBatch], count: int, now: float | None) -> int:
        empty = ExampleBatch.empty()
        return sum(self._step(steps[i] if i < len(steps) else empty, now) for i in range(count))

    def flush(self, now: float | None = None) -> int:
        """Collective: trains what the cold-start holds still keep, on the labels known now (a
        stream that ends); returns this rank's count."""
        ln = self.learner
        held = ExampleBatch.empty()
        if ln.cold_hold is not None:
            held = ln.cold_hold.drain()
            ln.cold_hold_stats, ln.cold_hold = ln.cold_hold.summary(), None
        if len(held):
            ln.last_trained = held
        steps = steps_of(held, ln.cfg.batch_size)
        count = int(self._max([float(len(steps))])[0]) if self._hold_open else len(steps)
        self._hold_open = False
        return self._run(steps, count, now)

    def _step(self, batch: Any, now: float | None) -> int:
        """One global step on this rank's ``batch`` (de-duplicated, past the hold)."""
        ln, mc = self.learner, self.learner.model_cfg
        n = len(batch)
        labels = torch.from_numpy(np.ascontiguousarray(batch.label, np.float32))
        rates = torch.from_numpy(np.ascontiguousarray(batch.sample_rate, np.float32))
        emit = batch.emit if n and batch.early.any() else None
        w = 1.0 / rates.clamp(min=1e-6)
        pos, imps, early = start_counts(labels, rates, emit)
        n_all, w_all, pos_all, imps_all, early_all = self._global(
            [float(n), float(w.sum()), pos, imps, float(early)])
        t1 = time.perf_counter()
        if n_all == 0:
            return 0
        now = ln.clock() if now is None else now
        bags, plan = self.sparse.lookup(batch.sparse, n, train=True, now=now)
        t2 = time.perf_counter()
        emb = bags.emb
        if emit is not None and ln.cfg.early_memory_rows > 0:
            ln._same_x(emb, batch, emit)  # the copy trains on its negative's tower input
        if not ln._bias_settled:  # the head starts at the global batches' click rate
            first, last = self._span(batch)
            ln.start_bias(pos_all, imps_all, early_all > 0, first, last)
        dense = (torch.from_numpy(np.ascontiguousarray(batch.dense, np.float32))
                 if mc.dense_dim else None)
        if n == 0:
            # No rows here this step, but DDP's all-reduce needs this rank's (zero) gradients:
            # one all-zero row with weight 0 runs the whole graph and contributes exactly 0.
            emb = torch.zeros(1, len(mc.slots), mc.embedding_dim)
            dense = torch.zeros(1, mc.dense_dim) if mc.dense_dim else None
            labels, w = torch.zeros(1), torch.zeros(1)
        logits = ln.logits(emb, dense, self.tower)
        fnw = early_weights(logits, labels, emit, ln.cfg.early_correction)  # FNW on early rows
        per_row = nn.functional.binary_cross_entropy_with_logits(
            logits, labels, weight=w if fnw is None else w * fnw, reduction="sum")
        loss = per_row * (self.world / w_all)
        ln.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the tower's gradients here
        ln.optimizer.step()
        t3 = time.perf_counter()
        if n:
            ln.score_rows(logits.detach().cpu().numpy(), batch)
        grad = bags.emb.grad
        if grad is None:
            grad = torch.zeros_like(bags.emb)
        self.sparse.apply_gradients(plan, grad / self.world, now=now)
        t4 = time.perf_counter()
        ln.times.lookup += t2 - t1
        ln.times.forward_backward += t3 - t2
        ln.times.update += t4 - t3
        ln.times.examples += n
        ln.times.steps += 1
        ln.examples_trained += n
        self.global_examples += int(n_all)
        self.steps += 1
        return n

    def _span(self, batch: Any) -> tuple[int, int]:
        """(first, last) event time of the global batch (ms)."""
        t = batch.event_time_ms
        lo, hi = (-float(t.min()), float(t.max())) if len(t) else (-float("inf"), -float("inf"))
        neg_first, last = self._max([lo, hi])
        return int(-neg_first), int(last)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
