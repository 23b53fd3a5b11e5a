"""A small, real model for tests, benchmarks and demos: random tower, populated item/user rows."""

from __future__ import annotations

import numpy as np
import torch

from serving.scoring import ServingModel

__all__ = ["random_model"]


def random_model(slots: tuple[str, ...] = ("user_id", "item_id", "f00"), dim: int = 16, items: int = 1000,
                 users: int = 1000, dense_dim: int = 0, hidden: tuple[int, ...] = (256, 128, 64),
                 seed: int = 0, version: int = 1, watermark_ms: int = -1, model_id: str = "ctr") -> ServingModel:
    """A :class:`ServingModel` whose table holds rows for items ``0..items-1`` and users
    ``0..users-1`` (ids of other slots read the default vector)."""
    from embedding_store import EmbeddingTable, SlotConfig, SlotDelta, TableDelta
    from training.model import DenseTower, ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(slots=slots, embedding_dim=dim, dense_dim=dense_dim, hidden=hidden)
    tower = DenseTower(cfg).eval()
    table = EmbeddingTable([SlotConfig(name=s, dim=dim) for s in slots], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for slot, n in (("item_id", items), ("user_id", users)):
        if slot in slots and n:
            rows[slot] = SlotDelta(ids=np.arange(n, dtype=np.int64),
                                   values=torch.randn(n, dim, generator=gen) * 0.3)
    table.import_delta(TableDelta(from_version=0, to_version=version, slots=rows))
    return ServingModel(model_id, table, tower, int(table.version), watermark_ms)
