"""The two towers: hashed id/feature embeddings, mean-pooled per slot, an MLP head, L2-normalised.

User tower: ``user_id`` + the user-side slots + the mean of the user's recent clicked items
(embedded by the item tower's own table, so history and candidates share item rows). Item tower:
``item_id`` + the item-side slots. Ids are hashed into ``buckets`` rows per tower
(:func:`~training.two_tower.state.bucket_ids`, salted by slot): a retrieval model tolerates the
rare collision, and it keeps the towers a plain ``nn.Embedding`` with sparse gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from training.two_tower.state import Padded, bucket_ids

if TYPE_CHECKING:
    from streams.log_schema import LogSchema

__all__ = ["TwoTowerConfig", "TowerInputs", "TwoTowerModel"]

USER_SLOT, ITEM_SLOT = "user_id", "item_id"


@dataclass
class TwoTowerConfig:
    """Shape and learning of the two-tower retrieval model (see :mod:`training.two_tower`)."""

    user_slots: tuple[str, ...] = ()  # user-side sparse slots (besides user_id)
    item_slots: tuple[str, ...] = ()  # item-side sparse slots (besides item_id)
    dim: int = 64  # output vector width
    embedding_dim: int = 32  # width of each hashed embedding row
    hidden: int = 128  # MLP hidden width (0: one linear layer)
    buckets: int = 1 << 18  # hashed rows per tower
    max_bag: int = 8  # ids kept per multi-valued feature
    history_length: int = 20  # recent clicks pooled into the user tower (0 = none)
    temperature: float = 0.05  # logits = <u, v> / temperature
    init_std: float = 0.1  # std of new embedding rows
    lr: float = 0.005  # Adam on the heads, SparseAdam on the rows
    positives_per_step: int = 256  # clicks per in-batch softmax step (fewer wait for more)
    logq: bool = True  # subtract log q(item) from the in-batch logits (Yi et al. 2019)
    freq_buckets: int = 1 << 20  # hashed counters of the frequency estimate
    # The logQ estimate (training.two_tower.state): count, each item's decayed share of the clicks
    # trained, or gap, Yi et al.'s average steps between sightings. count is the default: it
    # retrieved better on both the generator and MovieLens (docs/benchmarks.md, retrieval-quality).
    freq_estimator: str = "count"
    freq_alpha: float = 0.2  # gap: moving-average rate (0.2 beat the paper's 0.05 in our runs)
    freq_decay: float = 0.97  # count: per-step decay of the counts
    dedup_capacity: int = 1 << 20  # example ids per de-dup generation (as the trainer's)
    seed: int = 0

    def validate(self) -> None:
        if min(self.dim, self.embedding_dim, self.buckets, self.max_bag, self.positives_per_step) <= 0:
            raise ValueError("dim, embedding_dim, buckets, max_bag, positives_per_step must be > 0")
        if self.temperature <= 0 or self.lr <= 0 or not 0 < self.freq_alpha <= 1:
            raise ValueError("temperature and lr must be > 0, freq_alpha in (0, 1]")
        if self.freq_estimator not in ("gap", "count") or not 0 < self.freq_decay <= 1:
            raise ValueError("freq_estimator must be gap or count, freq_decay in (0, 1]")
        if self.history_length < 0 or self.hidden < 0:
            raise ValueError("history_length and hidden must be >= 0")
        if {USER_SLOT, ITEM_SLOT} & set(self.user_slots + self.item_slots):
            raise ValueError("user_id/item_id are the towers' own slots, not features")

    @classmethod
    def for_generator(cls, **changes: object) -> "TwoTowerConfig":
        """The synthetic world's sides: ``segment`` describes the user, ``category`` the item."""
        sides: dict[str, object] = {"user_slots": ("segment",), "item_slots": ("category",)}
        return cls(**{**sides, **changes})  # type: ignore[arg-type]

    @classmethod
    def for_log(cls, schema: "LogSchema", **changes: object) -> "TwoTowerConfig":
        """A log's sides as its schema gives them (categorical and multi-valued columns)."""
        sides: dict[str, object] = {"user_slots": schema.user_slots(), "item_slots": schema.item_slots()}
        return cls(**{**sides, **changes})  # type: ignore[arg-type]


@dataclass
class TowerInputs:
    """One tower's rows: the entity ids, per slot padded feature ids, and (user) the history."""

    ids: np.ndarray  # int64[n]
    slots: dict[str, Padded] = field(default_factory=dict)
    history: Padded | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: slice | np.ndarray) -> "TowerInputs":
        """The rows ``rows`` (a slice or indices)."""
        return TowerInputs(self.ids[rows], {s: (p[0][rows], p[1][rows]) for s, p in self.slots.items()},
                           None if self.history is None else (self.history[0][rows], self.history[1][rows]))

    @staticmethod
    def concat(parts: list["TowerInputs"]) -> "TowerInputs":
        def cat(pads: list[Padded]) -> Padded:
            return np.concatenate([p[0] for p in pads]), np.concatenate([p[1] for p in pads])

        first = parts[0]
        history = None if first.history is None else cat([p.history for p in parts])  # type: ignore[misc]
        return TowerInputs(np.concatenate([p.ids for p in parts]),
                           {s: cat([p.slots[s] for p in parts]) for s in first.slots}, history)


def _head(n_in: int, hidden: int, dim: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(n_in, dim)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class TwoTowerModel(nn.Module):
    """User and item towers over hashed embeddings; both return unit-norm ``[n, dim]`` vectors."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e = cfg.embedding_dim
        self.user_rows = nn.Embedding(cfg.buckets, e, sparse=True)
        self.item_rows = nn.Embedding(cfg.buckets, e, sparse=True)
        for rows in (self.user_rows, self.item_rows):
            nn.init.normal_(rows.weight, std=cfg.init_std)
        n_user = 1 + len(cfg.user_slots) + (1 if cfg.history_length else 0)
        self.user_head = _head(n_user * e, cfg.hidden, cfg.dim)
        self.item_head = _head((1 + len(cfg.item_slots)) * e, cfg.hidden, cfg.dim)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.user_rows.weight, self.item_rows.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        return [*self.user_head.parameters(), *self.item_head.parameters()]

    def _pool(self, rows: nn.Embedding, slot: str, pad: Padded) -> torch.Tensor:
        ids, mask = pad
        emb = rows(torch.from_numpy(bucket_ids(ids, slot, self.cfg.buckets)))
        m = torch.from_numpy(mask).to(emb.dtype).unsqueeze(-1)
        return (emb * m).sum(1) / m.sum(1).clamp(min=1.0)

    def _single(self, rows: nn.Embedding, slot: str, ids: np.ndarray) -> torch.Tensor:
        return rows(torch.from_numpy(bucket_ids(ids, slot, self.cfg.buckets)))

    def _parts(self, rows: nn.Embedding, id_slot: str, slots: tuple[str, ...], x: TowerInputs) -> list[torch.Tensor]:
        """The id's row and each feature slot's pooled bag (an absent slot pools to zeros)."""
        n, w = len(x), self.cfg.max_bag
        parts = [self._single(rows, id_slot, x.ids)]
        for s in slots:
            pad = x.slots.get(s) or (np.zeros((n, w), np.int64), np.zeros((n, w), bool))
            parts.append(self._pool(rows, s, pad))
        return parts

    def user(self, x: TowerInputs) -> torch.Tensor:
        parts = self._parts(self.user_rows, USER_SLOT, tuple(self.cfg.user_slots), x)
        if self.cfg.history_length:
            assert x.history is not None, "the user tower pools a history"
            parts.append(self._pool(self.item_rows, ITEM_SLOT, x.history))
        return nn.functional.normalize(self.user_head(torch.cat(parts, 1)), dim=1)

    def item(self, x: TowerInputs) -> torch.Tensor:
        parts = self._parts(self.item_rows, ITEM_SLOT, tuple(self.cfg.item_slots), x)
        return nn.functional.normalize(self.item_head(torch.cat(parts, 1)), dim=1)
