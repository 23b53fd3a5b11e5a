"""Pooling slot bags out of the table, and routing the pooled gradient back to the ids.

Training keeps the table out of autograd on purpose: :func:`lookup_slots` reads bags under
``no_grad`` and returns leaf tensors with ``requires_grad``; after ``backward`` the bag gradients
are expanded to the ids they pooled (:func:`bag_grads_to_ids`) and handed to the table's own
per-row optimizers. Only touched rows change, which is what makes delta sync small.

Each slot pools by its own mode (``ModelConfig.slot_poolings``): sum or mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

__all__ = ["BagTable", "RaggedLike", "SlotBags", "lookup_slots", "slot_modes", "bag_grads_to_ids"]


class BagTable(Protocol):
    """The part of ``embedding_store.EmbeddingTable`` the model needs (duck-typed on purpose)."""

    def lookup_bags(self, slot: str, ids: torch.Tensor, offsets_or_lengths: torch.Tensor,
                    mode: str = "sum", train: bool = False, **kw: Any) -> torch.Tensor: ...


class RaggedLike(Protocol):
    values: np.ndarray
    lengths: np.ndarray


@dataclass
class SlotBags:
    """One batch's pooled embeddings as a leaf tensor, plus what is needed to route its gradient."""

    emb: torch.Tensor  # float32[B, S, D], leaf (requires_grad when training)
    ids: list[torch.Tensor]  # per slot: int64[m_s]
    lengths: list[torch.Tensor]  # per slot: int64[B]


def lookup_slots(table: BagTable, slots: Sequence[str], sparse: Mapping[str, RaggedLike],
                 batch_size: int, pooling: str | Sequence[str] = "sum", train: bool = False,
                 now: float | None = None) -> SlotBags:
    """Pools each slot's bag from ``table`` under ``no_grad``; a slot absent from ``sparse`` is empty.

    ``pooling``: one mode for every slot, or one per slot (``ModelConfig.slot_poolings()``).
    """
    modes = slot_modes(pooling, len(slots))
    pooled, all_ids, all_lengths = [], [], []
    with torch.no_grad():
        for slot, mode in zip(slots, modes):
            bag = sparse.get(slot)
            if bag is None:
                ids = torch.zeros(0, dtype=torch.int64)
                lengths = torch.zeros(batch_size, dtype=torch.int64)
            else:
                ids = torch.from_numpy(np.ascontiguousarray(bag.values, dtype=np.int64))
                lengths = torch.from_numpy(np.ascontiguousarray(bag.lengths)).to(torch.int64)
                if lengths.shape[0] != batch_size:
                    raise ValueError(f"slot {slot!r} has {lengths.shape[0]} bags for {batch_size} rows")
            kw: dict[str, Any] = {"mode": mode, "train": train}
            if train and now is not None:
                kw["now"] = now
            pooled.append(table.lookup_bags(slot, ids, lengths, **kw))
            all_ids.append(ids)
            all_lengths.append(lengths)
    emb = torch.stack(pooled, dim=1) if pooled else torch.zeros(batch_size, 0, 1)
    emb = emb.float().contiguous()
    if train:
        emb.requires_grad_(True)
    return SlotBags(emb, all_ids, all_lengths)


def slot_modes(pooling: str | Sequence[str], n: int) -> tuple[str, ...]:
    """``pooling`` as one mode per slot of ``n`` slots."""
    modes = (pooling,) * n if isinstance(pooling, str) else tuple(pooling)
    if len(modes) != n:
        raise ValueError(f"{len(modes)} pooling modes for {n} slots")
    return modes


def bag_grads_to_ids(bag_grad: torch.Tensor, lengths: torch.Tensor,
                     pooling: str = "sum") -> torch.Tensor:
    """Expands per-bag gradients float32[B, D] to the ids they pooled: float32[sum(lengths), D].

    For sum pooling every id of a bag receives the bag's gradient; for mean, divided by the
    bag length. Duplicate ids are left for the table to sum.
    """
    grads = torch.repeat_interleave(bag_grad, lengths, dim=0)
    if pooling == "mean":
        scale = torch.repeat_interleave(1.0 / lengths.clamp(min=1).to(bag_grad.dtype), lengths)
        grads = grads * scale.unsqueeze(1)
    return grads
