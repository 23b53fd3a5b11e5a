"""The two-tower model inside the trainer: it learns the ranker's batches and writes its vectors
into the ranker's table, so they ship to serving as ordinary rows.

After each batch, :meth:`TwoTowerRows.step` writes the query vector of every user in the batch
(user tower at the batch's newest event time, so the history holds every click learned so far)
under :data:`paramsync.USER_VECTORS`, and the vector of every item in it under
:data:`paramsync.ITEM_VECTORS`. A step moves every item's vector a little (the item tower's layers
are shared), so every ``refresh_s`` all items seen are written again; between refreshes an item
not in recent batches is served with a vector up to that old. The publisher then ships the
changed rows like any others, and a serving replica's ANN index follows the item slot.

Which of the data's slots describe the user and which the item is read from the first batch: a
slot whose bag is the same on every row of an item is item-side, any other user-side (the rule
the log schema's inference uses). The towers' state (weights, optimizers, histories, item
features, frequency counts, de-dup) is saved in the trainer's checkpoint; a restarted trainer
continues from it and re-ships every item's vector with its first batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from embedding_store import SlotConfig
from embedding_store.delta import SlotDelta, TableDelta
from paramsync.retrieval_slots import ITEM_VECTORS, USER_VECTORS
from streams.example_batch import ExampleBatch, Ragged
from training.two_tower.learner import TwoTowerLearner
from training.two_tower.model import ITEM_SLOT, USER_SLOT, TwoTowerConfig

log = logging.getLogger(__name__)

__all__ = ["TwoTowerRows", "item_side_slots"]


def _bag_signature(bags: Ragged) -> np.ndarray:
    """uint64 per row, equal for equal bags (order-sensitive; collisions only make a slot look
    user-side, the safe direction)."""
    n = len(bags.lengths)
    if len(bags.values) == 0:
        return np.zeros(n, np.uint64)
    pos = np.arange(len(bags.values)) - np.repeat(np.cumsum(bags.lengths) - bags.lengths, bags.lengths)
    mixed = (bags.values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) * (pos.astype(np.uint64) * np.uint64(2) + np.uint64(0xBF58476D1CE4E5B9))
    row = np.repeat(np.arange(n), bags.lengths)
    sig = np.zeros(n, np.uint64)
    np.add.at(sig, row, mixed)
    return sig ^ bags.lengths.astype(np.uint64)


def item_side_slots(batch: ExampleBatch) -> tuple[str, ...]:
    """The sparse slots whose bag never differs between two rows of one item in ``batch`` (the
    towers' own id slots left out)."""
    out = []
    order = np.argsort(batch.item_id, kind="stable")
    items = batch.item_id[order]
    same_item = items[1:] == items[:-1]
    for slot, bags in batch.sparse.items():
        if slot in (USER_SLOT, ITEM_SLOT):
            continue
        sig = _bag_signature(bags)[order]
        if not np.any(same_item & (sig[1:] != sig[:-1])):
            out.append(slot)
    return tuple(out)


class TwoTowerRows:
    """A :class:`TwoTowerLearner` fed the trainer's batches, writing its vectors into the table."""

    def __init__(self, dim: int = 64, refresh_s: float = 30.0, seed: int = 0,
                 clock: Any = time.monotonic) -> None:
        self.dim, self.refresh_s, self.seed, self.clock = dim, refresh_s, seed, clock
        self.learner: TwoTowerLearner | None = None
        self._refreshed = clock()
        self.refreshes = 0

    # -- checkpoint (beside the ranker's, in the trainer's) -----------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The towers' state for the trainer's checkpoint (nothing before the first batch)."""
        if self.learner is None:
            return {}, {}
        tensors, meta = self.learner.state()
        return tensors, {"two_tower": meta}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        """Continues from a checkpoint's towers; one without them leaves a fresh start."""
        if "two_tower" in meta:
            self.learner = TwoTowerLearner.from_state(tensors, meta["two_tower"])
            self._refreshed = float("-inf")  # the first batch re-ships every item's vector

    def _start(self, batch: ExampleBatch) -> TwoTowerLearner:
        item = item_side_slots(batch)
        user = tuple(s for s in batch.sparse if s not in item and s not in (USER_SLOT, ITEM_SLOT))
        log.info("two-tower: user-side slots %s, item-side slots %s", user, item)
        return TwoTowerLearner(TwoTowerConfig(user_slots=user, item_slots=item, dim=self.dim, seed=self.seed))

    def step(self, batch: ExampleBatch, table: Any) -> int:
        """Learns ``batch`` and writes the vectors of its users and items (all items when a
        refresh is due) into ``table``; returns the rows written."""
        if not len(batch):
            return 0
        if self.learner is None:
            self.learner = self._start(batch)
        tt = self.learner
        tt.step(batch)
        users, rows = _last_row_per_user(batch)
        at = np.full(len(users), int(batch.event_time_ms.max()) + 1, np.int64)
        user_vecs = tt.user_vectors(users, at, {s: batch.sparse[s].take(rows) for s in tt.cfg.user_slots
                                                if s in batch.sparse})
        now = self.clock()
        if now - self._refreshed >= self.refresh_s:
            items, self._refreshed = tt.items_seen(), now
            self.refreshes += 1
        else:
            items = np.unique(batch.item_id)
        item_vecs = tt.item_vectors(items)
        for slot in (USER_VECTORS, ITEM_VECTORS):
            if slot not in table.slots:
                table.add_slot(SlotConfig(name=slot, dim=self.dim, initializer="zeros"))
        v = int(table.version)
        table.import_delta(TableDelta(from_version=v, to_version=v + 1, slots={
            USER_VECTORS: SlotDelta(ids=users, values=user_vecs.to(torch.float32)),
            ITEM_VECTORS: SlotDelta(ids=np.asarray(items, np.int64), values=item_vecs.to(torch.float32))}))
        return len(users) + len(items)


def _last_row_per_user(batch: ExampleBatch) -> tuple[np.ndarray, np.ndarray]:
    """Distinct users of ``batch`` and, for each, the index of its newest row."""
    order = np.lexsort((batch.event_time_ms, batch.user_id))
    users = batch.user_id[order]
    last = np.ones(len(order), bool)
    last[:-1] = users[1:] != users[:-1]
    return users[last].astype(np.int64), order[last]
