"""One lockstep training step on one rank: sharded sparse half, data-parallel (DDP) dense tower.

:class:`ShardedLearner` wraps an ordinary :class:`training.learner.Learner` -- its table holds
only this rank's shard; its tower, Adam optimizer, de-dup filter and evaluator are used as they
are -- and replaces the lookup and the loss scaling:

- the loss of a global batch is ``sum(w * bce) / sum(w)`` over *all* ranks' rows. Each rank
  computes ``world * sum_r(w * bce) / W`` with ``W`` all-reduced, so DDP's gradient *average*
  is exactly the one-process gradient of the dense tower;
- the pooled-bag gradient on rank r is therefore ``world`` times its share of the global
  gradient; it is divided by ``world`` before it travels to the owners, who sum the shares.

Every rank calls :meth:`train` for every global step, with an empty batch when it has no rows:
the collectives inside need every rank. A step where no rank has a row is skipped by all.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training.distributed.exchange import ExchangeTimer, all_reduce_sum
from training.distributed.sharded import ShardedEmbedding
from training.learner import Learner
from training.model import init_bias_for_ctr

log = logging.getLogger(__name__)

__all__ = ["ShardedLearner"]


class ShardedLearner:
    """A :class:`Learner` whose table is one shard and whose tower trains under DDP."""

    def __init__(self, learner: Learner, rank: int, world_size: int) -> None:
        if learner.model_cfg.counters:
            raise ValueError("multi-rank training does not support per-id counters (counters=false)")
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
        self.global_examples = 0
        self.steps = 0
        self.compute_s = 0.0  # time in train() outside the exchange collectives

    @property
    def table(self) -> Any:
        return self.learner.table

    def _global(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t0 = time.perf_counter()
        out = all_reduce_sum(values)
        self.timer.seconds += time.perf_counter() - t0  # waiting here is waiting for peers, too
        return out

    def train(self, batch: Any, now: float | None = None) -> int:
        """One global step (every rank must call it); returns this rank's examples trained."""
        t_start, x_start = time.perf_counter(), self.timer.seconds
        ln, mc = self.learner, self.learner.model_cfg
        t0 = time.perf_counter()
        batch = ln.drop_seen(batch)
        n = len(batch)
        labels = torch.from_numpy(np.ascontiguousarray(batch.label, np.float32))
        rates = torch.from_numpy(np.ascontiguousarray(batch.sample_rate, np.float32))
        w = 1.0 / rates.clamp(min=1e-6)
        n_all, w_all, wy_all = self._global([float(n), float(w.sum()), float((w * labels).sum())])
        t1 = time.perf_counter()
        ln.times.dedup += t1 - t0
        if n_all == 0:
            return 0
        if n and len(batch.event_time_ms):
            ln.watermark_ms = max(ln.watermark_ms, int(batch.event_time_ms.max()))
        now = ln.clock() if now is None else now
        bags, plan = self.sparse.lookup(batch.sparse, n, train=True, now=now)
        t2 = time.perf_counter()
        if not ln._bias_set:  # the prior of the *global* batch: the same on every rank
            init_bias_for_ctr(ln.tower, wy_all / w_all)
            ln._bias_set = True
        emb = bags.emb
        dense = (torch.from_numpy(np.ascontiguousarray(batch.dense, np.float32))
                 if mc.dense_dim else None)
        if n == 0:
            # No rows here this step, but DDP's all-reduce needs this rank's (zero) gradients:
            # one all-zero row with weight 0 runs the whole graph and contributes exactly 0.
            emb = torch.zeros(1, len(mc.slots), mc.embedding_dim)
            dense = torch.zeros(1, mc.dense_dim) if mc.dense_dim else None
            labels, w = torch.zeros(1), torch.zeros(1)
        logits = ln.logits(emb, dense, self.tower)
        per_row = nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=w,
                                                                 reduction="sum")
        loss = per_row * (self.world / w_all)
        ln.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the tower's gradients here
        ln.optimizer.step()
        t3 = time.perf_counter()
        if n:
            ln.evaluator.update(logits.detach().numpy(), batch.label, batch.sample_rate,
                                batch.truth_p)
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
        self.compute_s += (time.perf_counter() - t_start) - (self.timer.seconds - x_start)
        return n

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
