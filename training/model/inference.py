"""Scoring one columnar batch with a table and a tower: crosses derived, slots pooled (each by
its own mode), tower forward. Serving's reference path; the trainer's step does the same."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from training.model.bags import BagTable, RaggedLike, lookup_slots
from training.model.crosses import with_cross_bags
from training.model.tower import DenseTower

__all__ = ["score"]


def score(table: BagTable, tower: DenseTower, sparse: Mapping[str, RaggedLike],
          dense: np.ndarray | None, batch_size: int) -> torch.Tensor:
    """Click probabilities float32[B] for one columnar batch (serving's entry point)."""
    cfg = tower.cfg
    bags = lookup_slots(table, cfg.slots, with_cross_bags(sparse, cfg.crosses, batch_size),
                        batch_size, cfg.slot_poolings(), train=False)
    dense_t = None
    if cfg.dense_dim:
        if dense is None:
            raise ValueError(f"model needs {cfg.dense_dim} dense features")
        dense_t = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    with torch.no_grad():
        return torch.sigmoid(tower(bags.emb, dense_t))
