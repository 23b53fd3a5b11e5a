"""The item vectors behind :class:`serving.ann_index.AnnIndex`: id -> row in one dense float32 array.

The store is the index's source of truth. The HNSW graph is derived from it (a rebuild copies
the store, a diff-sync compares against it, save writes it next to the graph), and in
``retrieval: exact`` mode it is the whole index: a brute-force scan of its rows. Rows of removed
items go on a free list and are reused; the id -> row map is the table's open-addressing
:class:`~embedding_store.id_index.IdIndex`, so every operation is a batch, with no per-item Python.

Not thread-safe by itself: the owning index serialises writers. Readers that may run beside a
writer (a rebuild's copy, a probe scan) read through :meth:`arrays`, whose arrays stay valid
(possibly stale) after a later growth, never freed under them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedding_store.id_index import IdIndex

log = logging.getLogger(__name__)

__all__ = ["RESERVED_ID", "UpsertPlan", "VectorStore", "ann_ids", "ann_keys", "check_items", "check_query",
           "topk_rows"]


@dataclass(frozen=True, slots=True)
class UpsertPlan:
    """What an upsert did: ``added`` ids were new, ``replaced`` ids had a different vector;
    ids whose vector was already stored exactly are in neither (nothing for the graph to do)."""

    added: np.ndarray
    replaced: np.ndarray


class VectorStore:
    """Live item ids and their vectors, ``[capacity, dim]`` float32, rows reused after removal."""

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        capacity = max(16, capacity)
        self._ids = np.zeros(capacity, np.int64)
        self._vecs = np.zeros((capacity, dim), np.float32)
        self._live = np.zeros(capacity, bool)
        self._free = np.zeros(0, np.int64)
        self._high = 0  # rows [0, high) have been used at least once
        self._map = IdIndex(capacity)

    def __len__(self) -> int:
        return len(self._map)

    @property
    def nbytes(self) -> int:
        return int(self._ids.nbytes + self._vecs.nbytes + self._live.nbytes + self._map.nbytes)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(ids, vectors, live mask, rows used) as they are now; valid after a later growth."""
        return self._ids, self._vecs, self._live, self._high

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self._map.find(ids) >= 0

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, vectors of the found ids)."""
        rows = self._map.find(ids)
        found = rows >= 0
        return found, self._vecs[rows[found]]

    def unchanged(self, ids: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        """Mask of the ``ids`` stored already with exactly ``vecs``."""
        found, old = self.get(ids)
        same = np.zeros(ids.size, bool)
        same[found] = np.all(old == vecs[found], axis=1)
        return same

    def upsert(self, ids: np.ndarray, vecs: np.ndarray) -> UpsertPlan:
        """Stores ``vecs`` under ``ids`` (distinct); returns which were new and which changed."""
        rows = self._map.find(ids)
        old = rows >= 0
        changed = old.copy()
        changed[old] = np.any(self._vecs[rows[old]] != vecs[old], axis=1)
        if changed.any():
            self._vecs[rows[changed]] = vecs[changed]
        new = ~old
        if new.any():
            fresh = self._take_rows(int(new.sum()))
            self._ids[fresh], self._vecs[fresh], self._live[fresh] = ids[new], vecs[new], True
            self._map.insert(ids[new], fresh)
        return UpsertPlan(added=ids[new], replaced=ids[changed])

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Forgets ``ids``; returns those that were present."""
        rows = self._map.find(ids)
        hit = rows >= 0
        if hit.any():
            self._map.remove(ids[hit])
            self._live[rows[hit]] = False
            self._free = np.concatenate([self._free, rows[hit]])
        return ids[hit]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the live (ids, vectors)."""
        ids, vecs, live, high = self.arrays()
        rows = np.flatnonzero(live[:high])
        return ids[rows].copy(), vecs[rows].copy()

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` live vectors drawn at random (with replacement)."""
        ids, vecs, live, high = self.arrays()
        rows = np.flatnonzero(live[:high])
        return vecs[rng.choice(rows, n)] if rows.size else np.zeros((0, self.dim), np.float32)

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``k`` by inner product for each query row: (ids [q, k'], scores [q, k'])."""
        ids, vecs, live, high = self.arrays()
        return topk_rows(ids[:high], vecs[:high], live[:high], queries, k)

    def _take_rows(self, n: int) -> np.ndarray:
        reuse, self._free = self._free[:n], self._free[n:]
        more = n - reuse.size
        if self._high + more > self._ids.size:
            self._grow(self._high + more)
        fresh = np.arange(self._high, self._high + more, dtype=np.int64)
        self._high += more
        return np.concatenate([reuse, fresh])

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._ids.size)
        ids, vecs, live = np.zeros(cap, np.int64), np.zeros((cap, self.dim), np.float32), np.zeros(cap, bool)
        ids[:self._high], vecs[:self._high], live[:self._high] = (
            self._ids[:self._high], self._vecs[:self._high], self._live[:self._high])
        self._ids, self._vecs, self._live = ids, vecs, live  # readers keep the old arrays


def topk_rows(ids: np.ndarray, vecs: np.ndarray, live: np.ndarray, queries: np.ndarray,
              k: int, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over ``vecs`` in row chunks (bounded scratch memory): the exact top ``k`` live
    rows per query, best first, as (ids, scores); fewer than ``k`` columns when fewer rows live."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32).reshape(-1, vecs.shape[1]))
    best_s = torch.full((q.shape[0], 0), float("-inf"))
    best_r = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    with torch.no_grad():
        for lo in range(0, ids.shape[0], chunk):
            hi = min(lo + chunk, ids.shape[0])
            s = q @ torch.from_numpy(vecs[lo:hi]).T
            s[:, ~torch.from_numpy(live[lo:hi])] = float("-inf")
            v, r = torch.topk(s, min(k, hi - lo), dim=1)
            best_s, idx = torch.topk(torch.cat([best_s, v], 1), min(k, best_s.shape[1] + v.shape[1]), dim=1)
            best_r = torch.gather(torch.cat([best_r, r + lo], 1), 1, idx)
    n_live = int(live.sum())
    best_s, best_r = best_s[:, :n_live], best_r[:, :n_live]
    return ids[best_r.numpy()], best_s.numpy()


def check_query(query: Any, k: int, dim: int, max_k: int) -> np.ndarray:
    """One finite query vector of ``dim`` values (float32, contiguous) and ``1 <= k <= max_k``, or
    a ``ValueError`` naming what is wrong (serving answers it as INVALID_ARGUMENT)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k: must be an integer, got {type(k).__name__}")
    if not 1 <= k <= max_k:
        raise ValueError(f"k: must be in [1, {max_k}], got {k}")
    q = np.asarray(query.detach().cpu().numpy() if hasattr(query, "detach") else query, dtype=np.float32)
    if q.ndim != 1 and not (q.ndim == 2 and q.shape[0] == 1):
        raise ValueError(f"query: must be one vector, got shape {tuple(q.shape)}")
    q = q.reshape(-1)
    if q.size != dim:
        raise ValueError(f"query: dimension {q.size} != index dimension {dim}")
    if not np.isfinite(q).all():
        raise ValueError("query: has NaN or infinite values")
    return np.ascontiguousarray(q)


# usearch keeps all-ones keys for free slots and faiss answers -1 for "no result": an item id
# -1 (a common "no item" sentinel in real logs) stored as its own bits was lost on save/restore
# (usearch) or read as no result (faiss). Keys are the ids XOR a constant instead; the one id
# that maps onto the reserved key is refused (logged) by :func:`check_items`.
_KEY_XOR = np.uint64(0x9E3779B97F4A7C15)
RESERVED_ID = int(np.array([np.uint64(0xFFFFFFFFFFFFFFFF) ^ _KEY_XOR], np.uint64).view(np.int64)[0])


def ann_keys(ids: np.ndarray) -> np.ndarray:
    """uint64 graph keys (usearch, faiss) of int64 item ids."""
    return np.ascontiguousarray(ids, np.int64).view(np.uint64) ^ _KEY_XOR


def ann_ids(keys: Any) -> np.ndarray:
    """int64 item ids of graph keys (the inverse of :func:`ann_keys`)."""
    return (np.asarray(keys).astype(np.uint64, copy=False) ^ _KEY_XOR).view(np.int64)


def check_items(ids: Any, vectors: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, vectors float32 ``[n, dim]``), finite, each id once (a repeated id: the last
    one wins), or a ``ValueError``; :data:`RESERVED_ID` is left out (logged)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    v = vectors.detach().cpu().numpy() if hasattr(vectors, "detach") else vectors
    v = np.ascontiguousarray(v, dtype=np.float32)
    if v.ndim != 2 or v.shape != (ids.size, dim):
        raise ValueError(f"vectors: shape {tuple(v.shape)} != ({ids.size}, {dim})")
    if not np.isfinite(v).all():
        raise ValueError("vectors: have NaN or infinite values")
    _, last = np.unique(ids[::-1], return_index=True)
    keep = np.sort(ids.size - 1 - last)
    keep = keep[ids[keep] != RESERVED_ID]
    if keep.size < last.size:
        log.warning("ann index: item id %d is reserved (its graph key is the free-slot key); left out",
                    RESERVED_ID)
    return ids[keep], v[keep]
