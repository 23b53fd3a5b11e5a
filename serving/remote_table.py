"""The sharded embedding source: what a recommender replica scores with over the PS fleet.

The embedding source interface the recommender scores with is the read API of
``embedding_store.EmbeddingTable``: ``slots``, ``lookup(slot, ids)`` and
``lookup_bags(slot, ids, lengths, mode)``. The local source is the table itself (``--role
all``); :class:`RemoteTable` is the sharded one, so :mod:`serving.scoring` and
:mod:`serving.recommender` need no change to use it. Its rows come from a
:class:`~serving.shard_fleet.ShardFleet` (the fan-out, its deadline and its degradation);
:meth:`RemoteTable.prefetch` fetches a whole micro-batch's ids in one fan-out, and the per-slot
``lookup``/``lookup_bags`` are then served from the prefetched rows. Bags are pooled here, with
the store's own ``embedding_bag``, so the scores equal those of one unsharded table over the same
parameters.

:class:`ShardedModelSource` is the recommender replica's model: the tower from the control
partition of ``hw.params`` (a :class:`~serving.param_server.ParamServer` reading no rows) plus a
:class:`RemoteTable` over the shards.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch

from embedding_store import kernels
from serving.scoring import ServingModel
from serving.shard_fleet import ShardFleet

__all__ = ["RemoteTable", "ShardedModelSource"]


class RemoteTable:
    """The sharded embedding source: ``EmbeddingTable``'s read API over a :class:`ShardFleet`.

    Beyond that API: :meth:`lookup_known` (rows and ``known`` in one fan-out) and
    :meth:`retrieve` (top k items, searched on the shards), which the recommender uses when a
    table offers them. ``version`` is the oldest version any shard reported (the trainer's table
    version, as :class:`ServingModel` carries it; -1 until every shard answered once).

    A table made by :meth:`prefetch` also holds prefetched rows (per slot: sorted unique ids and
    their rows) and answers ids among them without a round trip.
    """

    def __init__(self, fleet: ShardFleet, defaults: Any,
                 cached: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        self.fleet = fleet
        self.defaults = defaults
        self.slots = defaults.slots
        self.cached = dict(cached or {})

    def prefetch(self, wanted: Mapping[str, Any]) -> "RemoteTable":
        """A view of this table with every slot's ``wanted`` ids fetched in one fan-out.

        Scoring calls this once per micro-batch with all the ids it will look up; with
        ``fleet.batch_slots`` off it returns ``self`` (one fan-out per lookup, as before).
        """
        if not self.fleet.batch_slots:
            return self
        uniq = {slot: np.unique(_np_ids(ids)) for slot, ids in wanted.items()}
        rows = self.fleet.fetch_unique(uniq, self.defaults)
        return RemoteTable(self.fleet, self.defaults, {slot: (uniq[slot], rows[slot]) for slot in uniq})

    def _positions(self, slot: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, index of each id in rows) from the prefetched rows, or None if some id is not there."""
        hit = self.cached.get(slot)
        if hit is None:
            return None
        known, rows = hit
        if ids.size == 0:
            return rows, np.zeros(0, np.int64)
        pos = np.searchsorted(known, ids)
        if pos.max() >= known.size or not np.array_equal(known[pos], ids):
            return None
        return rows, pos

    def lookup(self, slot: str, ids: torch.Tensor, train: bool = False, now: float | None = None) -> torch.Tensor:
        if train:
            raise ValueError("a remote table is read-only")
        ids_np = _np_ids(ids)
        hit = self._positions(slot, ids_np)
        if hit is not None:
            return torch.from_numpy(hit[0][hit[1]])
        return torch.from_numpy(self.fleet.fetch(slot, ids_np, self.defaults))

    def lookup_bags(self, slot: str, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                    mode: str = "sum", train: bool = False, per_sample_weights: torch.Tensor | None = None,
                    *, offsets: torch.Tensor | None = None, now: float | None = None) -> torch.Tensor:
        """Pooled bags, pooled here from the fetched rows by the store's own kernel."""
        if train:
            raise ValueError("a remote table is read-only")
        ids_np = _np_ids(ids)
        offs = kernels.to_offsets(ids_np.size, lengths, offsets)
        hit = self._positions(slot, ids_np)
        if hit is None:
            uniq, inv = np.unique(ids_np, return_inverse=True)
            hit = (self.fleet.fetch(slot, uniq, self.defaults), inv)
        w = None if per_sample_weights is None else per_sample_weights.to(torch.float32)
        return kernels.embedding_bag(torch.from_numpy(hit[0]), torch.from_numpy(hit[1].astype(np.int64)), offs, mode, w)

    @property
    def version(self) -> int:
        return self.fleet.version()

    def lookup_known(self, slot: str, ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(float32[n, dim] rows, bool[n]: the id has a row of its own) from every shard at once;
        :class:`~serving.shard_fleet.ShardsUnavailable` if a shard holding some of them does not
        answer."""
        rows, known = self.fleet.fetch_known(slot, _np_ids(ids), self.defaults)
        return torch.from_numpy(rows), known

    def retrieve(self, slot: str, query: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` items of ``slot`` by dot product with ``query``, searched on the shards."""
        return self.fleet.retrieve(slot, query.detach().float().cpu().numpy(), k)

    def ids(self, slot: str) -> np.ndarray:
        raise NotImplementedError("the rows live on the PS shards and are not listed here; use "
                                  "lookup_known / retrieve, which ask the shards")

    def export_delta(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError("the rows live on the PS shards; retrieval runs there (retrieve)")


class ShardedModelSource:
    """A recommender replica's model source: control-partition tower + rows from the shards."""

    def __init__(self, control: Any, fleet: ShardFleet) -> None:
        self.control = control  # a ParamServer on the control partition
        self.fleet = fleet

    @property
    def ready(self) -> bool:
        return bool(self.control.ready)

    def current(self) -> ServingModel | None:
        base = self.control.current()
        if base is None:
            return None
        version = self.fleet.version()
        watermark = self.fleet.watermark_ms()
        return ServingModel(base.model_id, RemoteTable(self.fleet, base.table), base.tower,
                            version if version >= 0 else base.version,
                            watermark if watermark >= 0 else base.watermark_ms)

    def freshness_lag_ms(self, now_ms: int | None = None) -> int:
        wm = self.fleet.watermark_ms()
        if wm < 0:
            return self.control.freshness_lag_ms(now_ms)
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return max(now_ms - wm, 0)


def _np_ids(ids: Any) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(ids, dtype=np.int64)
