"""An inverted-file index of 8-bit scalar-quantised vectors (faiss ``IndexIVFScalarQuantizer``)
behind the small part of usearch's ``Index`` API that :class:`serving.ann_index.AnnIndex` uses:
``add``, ``remove``, ``contains``, ``search``, ``save``, ``memory_usage``, ``len``.

Why (issue 21, ``headwater bench retrieval``, 1M clustered dim-64 items, 2 shared cores): the
HNSW graph needs ~25 min to build 1M items on two cores and, at its recall target, costs about a
third of an exact scan; k-means over a sample plus one assignment pass builds this in ~25 s, and
scanning 1/8 of the lists in 8-bit codes (64 bytes an item, a quarter of float32) reaches
recall@100 0.97 at ~1.8 ms a query (exact scan 28 ms). The owner rescores a shortlist from its
float32 vectors, so the codes only choose candidates; returned scores are exact.

Items are added to their nearest list and removed through a hash table of id -> (list, offset)
(faiss ``DirectMap.Hashtable``): both cost microseconds, so an update is visible to the next
query. The lists' centroids and the quantiser's ranges come from the catalog at build time; a
catalog that drifts away from them loses recall, which the owner's probe queries notice and a
rebuild (a fresh :func:`build`) repairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.ann_vectors import ann_ids

__all__ = ["IvfGraph", "IvfMatches", "auto_nlist", "build", "restore", "nprobe_for", "rescored_topk",
           "list_reason"]

MIN_PER_LIST = 39  # faiss's k-means wants at least this many training points per centroid
TRAIN_PER_LIST = 50  # sample size per list for k-means: more costs build time, not recall


@dataclass(frozen=True, slots=True)
class IvfMatches:
    """One query's candidates, as usearch's ``Matches``: keys (uint64) and distances."""

    keys: np.ndarray
    distances: np.ndarray


def auto_nlist(n: int) -> int:
    """Lists for ``n`` items: the power of two nearest ``2 sqrt(n)`` (1M -> 2048), at most
    ``n / 39`` so k-means has points enough, at least 1."""
    if n <= 0:
        return 1
    nl = 2 ** round(math.log2(max(1.0, 2.0 * math.sqrt(n))))
    return int(max(1, min(nl, n // MIN_PER_LIST)))


class IvfGraph:
    """A trained IVF-SQ8 index by inner product, keyed by uint64 ids (as usearch's keys)."""

    def __init__(self, index: Any) -> None:
        import faiss

        self._faiss = faiss
        self.index = index
        self.nprobe = 1

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    @property
    def ndim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def memory_usage(self) -> int:
        """Bytes, estimated: codes and ids per item, the id hash table (~24 bytes an entry),
        centroids, and the quantiser's ranges."""
        n, d = len(self), self.ndim
        return int(n * (self.index.code_size + 8 + 24) + self.nlist * d * 4 + 2 * d * 4)

    def add(self, keys: np.ndarray, vecs: np.ndarray, threads: int = 1) -> None:
        self._faiss.omp_set_num_threads(max(1, threads))
        self.index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.asarray(keys).view(np.int64))

    def remove(self, keys: np.ndarray) -> int:
        keys = np.ascontiguousarray(np.asarray(keys).view(np.int64))
        return int(self.index.remove_ids(self._faiss.IDSelectorArray(keys.size, self._faiss.swig_ptr(keys))))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        dm = self.index.direct_map
        out = np.zeros(len(keys), bool)
        for i, key in enumerate(np.asarray(keys).view(np.int64).tolist()):
            try:
                dm.get(key)
                out[i] = True
            except RuntimeError:
                pass
        return out

    def search(self, query: np.ndarray, k: int, threads: int = 1) -> IvfMatches:
        """The ``k`` best candidates by the quantised inner product (fewer when fewer are held);
        ``distances`` are ``1 - score``, as usearch's ``ip`` metric."""
        self._faiss.omp_set_num_threads(max(1, threads))
        self.index.nprobe = max(1, min(self.nprobe, self.nlist))
        scores, ids = self.index.search(np.ascontiguousarray(query, np.float32).reshape(1, -1), k)
        hit = ids[0] != -1  # faiss: -1 is "no result" (keys are any other 64-bit value)
        return IvfMatches(ids[0][hit].view(np.uint64), 1.0 - scores[0][hit])

    def save(self, path: str) -> None:
        self._faiss.write_index(self.index, path)


def build(ids: np.ndarray, vecs: np.ndarray, nlist: int = 0, threads: int = 1, seed: int = 0,
          range_margin: float = 0.05) -> IvfGraph:
    """An index over ``vecs`` (at least one row): ``nlist`` lists (0: :func:`auto_nlist`),
    centroids by k-means over a sample, 8-bit ranges per dimension from the same sample widened by
    ``range_margin`` of their span on each side (room for items that arrive later)."""
    import faiss

    n, d = vecs.shape
    if n == 0:
        raise ValueError("an IVF index needs at least one vector to train on")
    nlist = int(max(1, min(nlist or auto_nlist(n), n)))
    faiss.omp_set_num_threads(max(1, threads))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.sq.rangestat = faiss.ScalarQuantizer.RS_minmax
    index.sq.rangestat_arg = range_margin
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # a small catalog trains fewer points per list, silently
    rng = np.random.default_rng(seed)
    sample = vecs if n <= TRAIN_PER_LIST * nlist else vecs[np.sort(rng.choice(n, TRAIN_PER_LIST * nlist, replace=False))]
    index.train(np.ascontiguousarray(sample, np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    graph = IvfGraph(index)
    graph.add(ids, vecs, threads=threads)
    return graph


def restore(path: str) -> IvfGraph:
    """An index saved by :meth:`IvfGraph.save`; raises ``ValueError`` for a file that is not one."""
    import faiss

    try:
        index = faiss.read_index(path)
    except RuntimeError as e:
        raise ValueError(f"not a faiss index: {e}") from e
    if not isinstance(index, faiss.IndexIVFScalarQuantizer):
        raise ValueError(f"not an IVF-SQ index: {type(index).__name__}")
    return IvfGraph(index)


def nprobe_for(graph: Any, nprobe: int, min_scan: int) -> int:
    """Lists a query scans: ``nprobe`` when set, else 3/32 of the lists, or as many as hold
    ``min_scan`` items on average when that is more (1 for anything but an :class:`IvfGraph`)."""
    if not isinstance(graph, IvfGraph):
        return 1
    nlist = graph.nlist
    floor = -(-nlist * min_scan // max(1, len(graph)))
    return min(nlist, nprobe or max(1, 3 * nlist // 32, floor))


def rescored_topk(graph: IvfGraph, store: Any, q: np.ndarray, k: int, rerank: int) -> tuple[np.ndarray, np.ndarray]:
    """``rerank * k`` candidates from the 8-bit codes, rescored with ``store``'s float32 vectors:
    the best ``k`` ids and their exact scores (call under the owner's lock)."""
    cand = ann_ids(graph.search(q, rerank * k, threads=1).keys)
    found, vecs = store.get(cand)
    cand, scores = cand[found], vecs @ q
    best = np.argsort(-scores, kind="stable")[:k]
    return cand[best], scores[best].astype(np.float32)


def list_reason(items: int, untrained: bool, min_items: int) -> str | None:
    """Why the lists should be built now: ``untrained`` (enough items to train lists on),
    ``growth`` (the catalog outgrew them), or None below ``min_items``."""
    if items < min_items:
        return None
    return "untrained" if untrained else "growth"
