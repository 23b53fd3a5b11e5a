"""What a scoring call takes: the replica it scores with (:class:`ServingModel`), one ranking
request (:class:`RankJob`), explicit rows (:class:`ExampleRows`) and the item-side feature source
(:class:`ItemSource`). Plain records, shared by :mod:`serving.scoring` and the modules it uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from serving.item_catalog import ItemRows

__all__ = ["ServingModel", "RankJob", "ItemSource", "ExampleRows"]


@dataclass(frozen=True)
class ServingModel:
    """An immutable view of the replica that one batch is scored with.

    ``table`` is an ``embedding_store.EmbeddingTable`` (its own lock makes reads safe while the
    parameter server imports deltas); ``tower`` a ``training.model.DenseTower`` that is replaced,
    never mutated, when new dense weights arrive.
    """

    model_id: str
    table: Any
    tower: Any
    version: int
    watermark_ms: int

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.tower.cfg.slots)

    @property
    def dense_dim(self) -> int:
        return int(self.tower.cfg.dense_dim)


@dataclass
class RankJob:
    """One ranking request: ``items`` (int64[N]) scored for ``user_id`` with request-level features."""

    user_id: int
    items: np.ndarray
    context: Mapping[str, np.ndarray] = field(default_factory=dict)  # slot -> int64 ids
    # float32[dense_dim], or only the user-side part when an item catalog adds the item-side
    # tail (see item_dense_width), or None (zeros; the catalog's tail still added)
    dense: np.ndarray | None = None


class ItemSource(Protocol):
    """Item-side features per candidate (``serving.item_catalog.ItemCatalog``)."""

    @property
    def slots(self) -> frozenset[str]: ...

    @property
    def dense_width(self) -> int: ...

    def rows(self, items: np.ndarray, slots: Sequence[str], dense: bool) -> "ItemRows": ...


@dataclass
class ExampleRows:
    """A columnar batch for ``Score``: per slot, ragged ids (values int64[m], lengths int64[B])."""

    size: int
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray | None  # float32[B, dense_dim] or None (zeros)
