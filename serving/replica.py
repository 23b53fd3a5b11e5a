"""Serving's replica of the trainer's parameters: :class:`paramsync.ReplicaState` with the tower
rebuilt by the model definition (:mod:`training.model`, the one part of training serving imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from paramsync import LoadedTower, ReplicaState, TowerLoader
from training.model import resolve_device, tower_from_safetensors

__all__ = ["ModelReplica", "load_dense_tower"]


def load_dense_tower(data: bytes, device: str | torch.device = "cpu") -> LoadedTower:
    """A :class:`training.model.DenseTower` from the safetensors bytes of a dense payload, on
    ``device``."""
    tower, _ = tower_from_safetensors(data)
    if torch.device(device).type != "cpu":
        tower = tower.to(device)
    return LoadedTower(tower, tuple(tower.cfg.slots), int(tower.cfg.embedding_dim))


@dataclass
class ModelReplica(ReplicaState):
    """A :class:`paramsync.ReplicaState` whose towers are the model's :class:`DenseTower`, table
    and towers on ``device`` (validated here: a missing GPU fails at start, not at a snapshot)."""

    load_tower: TowerLoader = field(default=load_dense_tower, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.device.type != "cpu" and self.load_tower is load_dense_tower:
            self.load_tower = partial(load_dense_tower, device=self.device)
