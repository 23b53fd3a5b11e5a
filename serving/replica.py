"""Serving's replica of the trainer's parameters: :class:`paramsync.ReplicaState` with the tower
rebuilt by the model definition (:mod:`training.model`, the one part of training serving imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from paramsync import LoadedTower, ReplicaState, TowerLoader
from training.model import tower_from_safetensors

__all__ = ["ModelReplica", "load_dense_tower"]


def load_dense_tower(data: bytes) -> LoadedTower:
    """A :class:`training.model.DenseTower` from the safetensors bytes of a dense payload."""
    tower, _ = tower_from_safetensors(data)
    return LoadedTower(tower, tuple(tower.cfg.slots), int(tower.cfg.embedding_dim))


@dataclass
class ModelReplica(ReplicaState):
    """A :class:`paramsync.ReplicaState` whose towers are the model's :class:`DenseTower`."""

    load_tower: TowerLoader = field(default=load_dense_tower, kw_only=True, repr=False)
