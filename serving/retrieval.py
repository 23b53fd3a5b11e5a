"""Exact top-k retrieval by dot product over the item embeddings, kept current as rows update.

When ``Recommend`` gets no candidates, the query vector (the pooled user and context bags) is
dotted with every item row and the best ``k`` are handed to the ranker. The model's FM term
scores pairs of slots by exactly this inner product, so it is the model's own notion of affinity.

:class:`ItemIndex` mirrors one slot of the replica table as a dense ``[n, dim]`` matrix. It syncs
lazily before a query: only rows changed since the table version it last saw are copied in
(``export_delta``), deleted (expired) rows are dropped, and a replaced table (a new snapshot)
triggers a full rebuild. Everything is vectorised: no per-item Python.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

__all__ = ["ItemIndex"]


class ItemIndex:
    """Sorted item ids with their vectors; ``topk(query, k)`` is one matmul and one ``torch.topk``."""

    def __init__(self, slot: str = "item_id") -> None:
        self.slot = slot
        self.ids = np.zeros(0, np.int64)
        self.vectors = torch.zeros(0, 0)
        self._table_ref: Any = None
        self._version = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def version(self) -> int:
        """The table version the rows reflect (-1 before the first sync)."""
        return self._version

    def sync(self, table: Any) -> int:
        """Brings the index up to ``table``'s current version; returns rows changed."""
        with self._lock:
            if table is not self._table_ref:
                self._table_ref, self._version = table, -1
                self.ids = np.zeros(0, np.int64)
                self.vectors = torch.zeros(0, table.slots[self.slot].dim)
            if table.version == self._version:
                return 0
            delta = table.export_delta(since_version=max(self._version, 0), slots=[self.slot])
            self._version = delta.to_version
            sd = delta.slots[self.slot]
            self._apply(sd.ids.astype(np.int64), sd.values.float(), sd.deleted_ids.astype(np.int64))
            return int(sd.ids.size + sd.deleted_ids.size)

    def _apply(self, ids: np.ndarray, values: torch.Tensor, deleted: np.ndarray) -> None:
        keep_ids, keep_vec = self.ids, self.vectors
        drop = np.isin(keep_ids, np.concatenate([deleted, ids]))  # upserts are re-added below
        if drop.any():
            keep = torch.from_numpy(~drop)
            keep_ids, keep_vec = keep_ids[~drop], keep_vec[keep]
        all_ids = np.concatenate([keep_ids, ids])
        all_vec = torch.cat([keep_vec, values.reshape(-1, keep_vec.shape[1])], dim=0)
        order = np.argsort(all_ids, kind="stable")
        self.ids = all_ids[order]
        self.vectors = all_vec.index_select(0, torch.from_numpy(order)).contiguous()

    def topk(self, query: torch.Tensor, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` item ids with the largest ``<query, item>`` (ties: lower id first) and their dots."""
        with self._lock:
            ids, vecs = self.ids, self.vectors
        if ids.size == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        with torch.no_grad():
            dots = vecs @ query.reshape(-1).to(vecs.dtype)
            if exclude is not None and exclude.size:
                dots[torch.from_numpy(np.isin(ids, exclude))] = float("-inf")
            vals, idx = torch.topk(dots, min(k, ids.size))
        keep = torch.isfinite(vals)
        return ids[idx[keep].numpy()], vals[keep].numpy()
