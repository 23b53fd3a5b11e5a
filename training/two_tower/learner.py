"""Online learning of the two towers from the trainer's own example batches.

:meth:`TwoTowerLearner.step` takes the very :class:`~streams.example_batch.ExampleBatch` the
ranker's :class:`~training.learner.Learner` trains on. Every row tells the item cache the item's
features; the clicked rows (``label > 0``) are the positives. A user's history holds the clicks
stored so far, and a row reads only those with an event time strictly before its own (those of
its own batch included), so no row ever sees its own or a later click. Positives wait until
``positives_per_step`` of them have come (a trainer batch holds a few dozen clicks: too few
in-batch negatives), then one step of in-batch sampled softmax:

    logits[i, j] = <u_i, v_j> / temperature - log q(item_j)

with ``q`` the streaming frequency estimate (logQ correction, Yi et al. 2019), rows ``j != i``
holding row ``i``'s own item masked out, and cross-entropy against the diagonal.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from streams.example_batch import ExampleBatch, Ragged
from training.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from training.dedup import SeenFilter
from training.two_tower.model import TowerInputs, TwoTowerConfig, TwoTowerModel
from training.two_tower.state import (CountEstimator, FrequencyEstimator, HistoryStore,
                                      ItemFeatureCache, padded)

log = logging.getLogger(__name__)

__all__ = ["TwoTowerStats", "TwoTowerLearner"]


@dataclass
class TwoTowerStats:
    """What the learner did so far."""

    examples: int = 0  # rows learned (after de-dup)
    positives: int = 0  # clicked rows among them
    steps: int = 0  # in-batch softmax steps taken
    trained: int = 0  # positives trained on
    last_loss: float = float("nan")
    seconds: float = 0.0  # inside remember() and learn()


def _bags(batch: ExampleBatch, slots: tuple[str, ...]) -> dict[str, Ragged]:
    return {s: batch.sparse[s] for s in slots if s in batch.sparse}


class TwoTowerLearner:
    """The two-tower model, its optimizers and its online state; :meth:`step` learns a batch."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = TwoTowerModel(cfg)
        self.sparse_opt = torch.optim.SparseAdam(self.model.sparse_parameters(), lr=cfg.lr)
        self.dense_opt = torch.optim.Adam(self.model.dense_parameters(), lr=cfg.lr)
        self.history = HistoryStore(max(cfg.history_length, 1))
        self.items = ItemFeatureCache(cfg.item_slots, cfg.max_bag)
        self.freq = (FrequencyEstimator(cfg.freq_buckets, cfg.freq_alpha)
                     if cfg.freq_estimator == "gap" else CountEstimator(cfg.freq_buckets, cfg.freq_decay))
        self.dedup = SeenFilter(cfg.dedup_capacity, generations=2)
        self.stats = TwoTowerStats()
        self._pending: list[tuple[TowerInputs, TowerInputs]] = []
        self._pending_rows = 0

    # -- inputs ---------------------------------------------------------------------------
    def user_inputs(self, users: np.ndarray, time_ms: np.ndarray,
                    user_sparse: dict[str, Ragged] | None = None) -> TowerInputs:
        """User-tower rows for ``users`` at ``time_ms`` (history: clicks strictly before it)."""
        users = np.asarray(users, np.int64)
        n, sparse = len(users), user_sparse or {}
        hist = self.history.lookup(users, time_ms) if self.cfg.history_length else None
        return TowerInputs(users, {s: padded(sparse.get(s), n, self.cfg.max_bag)
                                   for s in self.cfg.user_slots}, hist)

    def item_inputs(self, item_ids: np.ndarray, item_sparse: dict[str, Ragged] | None = None
                    ) -> TowerInputs:
        """Item-tower rows: features from ``item_sparse`` if given, else the item cache."""
        ids = np.asarray(item_ids, np.int64)
        if item_sparse is None:
            return TowerInputs(ids, self.items.features(ids))
        return TowerInputs(ids, {s: padded(item_sparse.get(s), len(ids), self.cfg.max_bag)
                                 for s in self.cfg.item_slots})

    # -- vectors --------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, users: np.ndarray, time_ms: np.ndarray,
                     user_sparse: dict[str, Ragged] | None = None) -> torch.Tensor:
        """float32[n, dim], unit norm: the query vectors of ``users`` at ``time_ms``."""
        return self.model.user(self.user_inputs(users, time_ms, user_sparse))

    def user_vectors_for(self, batch: ExampleBatch) -> torch.Tensor:
        """The query vector of each row of ``batch`` (its user, time and user-side features)."""
        return self.user_vectors(batch.user_id, batch.event_time_ms, _bags(batch, self.cfg.user_slots))

    @torch.no_grad()
    def item_vectors(self, item_ids: np.ndarray, chunk: int = 65536) -> torch.Tensor:
        """float32[n, dim], unit norm: the vectors of ``item_ids`` with their cached features."""
        ids = np.asarray(item_ids, np.int64)
        if len(ids) == 0:
            return torch.zeros(0, self.cfg.dim)
        return torch.cat([self.model.item(self.item_inputs(ids[lo:lo + chunk]))
                          for lo in range(0, len(ids), chunk)])

    def items_seen(self) -> np.ndarray:
        """Every item any batch has shown so far (the retrieval catalog)."""
        return self.items.ids()

    # -- learning -------------------------------------------------------------------------
    def step(self, batch: ExampleBatch) -> int:
        """Learns ``batch`` (:meth:`remember`, then :meth:`learn`; example ids already seen are
        dropped); returns the positives trained by this call (0 while they gather)."""
        keep = self.dedup.filter_new(batch.example_id)
        if not keep.all():
            batch = batch.take(keep)
        if not len(batch):
            return 0
        self.remember(batch)
        return self.learn(batch)

    def remember(self, batch: ExampleBatch) -> None:
        """Stores the batch's items (catalog, features) and its clicks in the users' histories.

        A stored click only ever shows in the history of a row with a later event time, so
        remembering a batch before scoring or learning it lets each row see the clicks that
        came before it, those of the same batch included, and never its own or a later one.
        """
        t0 = time.perf_counter()
        self.items.observe(batch.item_id, _bags(batch, self.cfg.item_slots))
        if self.cfg.history_length:
            clicked = batch.label > 0
            self.history.add(batch.user_id[clicked], batch.item_id[clicked], batch.event_time_ms[clicked])
        self.stats.seconds += time.perf_counter() - t0

    def learn(self, batch: ExampleBatch) -> int:
        """Gathers the batch's clicks as positives (call :meth:`remember` first) and trains every
        full group of ``positives_per_step``; returns how many were trained."""
        t0 = time.perf_counter()
        self.stats.examples += len(batch)
        clicks = batch.take(batch.label > 0)
        trained = 0
        if len(clicks):
            users = self.user_inputs(clicks.user_id, clicks.event_time_ms,
                                     _bags(clicks, self.cfg.user_slots))
            items = self.item_inputs(clicks.item_id, _bags(clicks, self.cfg.item_slots))
            self._pending.append((users, items))
            self._pending_rows += len(clicks)
            self.stats.positives += len(clicks)
            if self._pending_rows >= self.cfg.positives_per_step:
                trained = self.flush(everything=False)
        self.stats.seconds += time.perf_counter() - t0
        return trained

    def flush(self, everything: bool = True) -> int:
        """Trains the gathered positives in steps of ``positives_per_step`` (in arrival order);
        the rest too when ``everything``, else it waits for more. Returns how many trained."""
        if not self._pending_rows:
            return 0
        users = TowerInputs.concat([u for u, _ in self._pending])
        items = TowerInputs.concat([i for _, i in self._pending])
        size, n = self.cfg.positives_per_step, len(users)
        stop = n if everything else n - n % size
        self._pending = [] if stop == n else [(users.take(slice(stop, n)), items.take(slice(stop, n)))]
        self._pending_rows = n - stop
        trained = 0
        for lo in range(0, stop, size):
            part = slice(lo, min(lo + size, stop))
            u, i = users.take(part), items.take(part)
            loss = self._train(u, i)
            if not np.isfinite(loss):
                log.error("two-tower: non-finite loss on %d positives; step skipped", len(u))
                continue
            self.stats.steps += 1
            self.stats.trained += len(u)
            self.stats.last_loss = loss
            trained += len(u)
        return trained

    def _train(self, users: TowerInputs, items: TowerInputs) -> float:
        self.freq.update(items.ids, self.stats.steps)
        u, v = self.model.user(users), self.model.item(items)
        logits = (u @ v.T) / self.cfg.temperature
        if self.cfg.logq:
            q = torch.from_numpy(self.freq.probability(items.ids)).to(logits.dtype)
            logits = logits - torch.log(q.clamp(min=1e-12)).unsqueeze(0)
        same = torch.from_numpy(items.ids[:, None] == items.ids[None, :])
        same.fill_diagonal_(False)  # the row's own positive stays; its duplicates are no negative
        logits = logits.masked_fill(same, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(users)))
        if not bool(torch.isfinite(loss)):
            return float("nan")
        self.sparse_opt.zero_grad(set_to_none=True)
        self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()
        return float(loss.detach())

    # -- checkpoint -----------------------------------------------------------------------
    _PARTS = ("history", "items", "freq")

    def state(self, prefix: str = "tt.") -> tuple[dict[str, torch.Tensor], str]:
        """What a restarted trainer continues from (weights, optimizers, histories, item
        features, frequency counts, de-dup) as tensors and one JSON string. The positives still
        gathering are trained first, in a smaller last step, so none is lost at a restart."""
        self.flush(everything=True)
        tensors = {f"{prefix}model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        sparse, sparse_meta = optimizer_to_tensors(self.sparse_opt, f"{prefix}sopt.")
        dense, dense_meta = optimizer_to_tensors(self.dense_opt, f"{prefix}dopt.")
        tensors.update(sparse)
        tensors.update(dense)
        arrays = {f"{part}.{k}": v for part in self._PARTS for k, v in getattr(self, part).state().items()}
        arrays.update(self.dedup.state())
        tensors.update({f"{prefix}{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
        meta = {"config": asdict(self.cfg), "sparse_opt": sparse_meta, "dense_opt": dense_meta,
                "stats": asdict(self.stats)}
        return tensors, json.dumps(meta)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta_json: str, prefix: str = "tt.") -> "TwoTowerLearner":
        """The learner :meth:`state` saved."""
        meta = json.loads(meta_json)
        cfg = TwoTowerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        tt = cls(cfg)
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        tt.model.load_state_dict({k[len("model."):]: v for k, v in mine.items() if k.startswith("model.")})
        optimizer_from_tensors(tt.sparse_opt, mine, meta["sparse_opt"], "sopt.")
        optimizer_from_tensors(tt.dense_opt, mine, meta["dense_opt"], "dopt.")
        arrays = {k: v.numpy() for k, v in mine.items()}
        for part in cls._PARTS:
            getattr(tt, part).load_state({k[len(part) + 1:]: v for k, v in arrays.items() if k.startswith(part + ".")})
        tt.dedup.load_state({k: v for k, v in arrays.items() if k.startswith("dedup.")})
        tt.stats = TwoTowerStats(**meta["stats"])
        return tt
