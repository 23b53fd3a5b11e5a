"""Approximate top-k item retrieval by inner product, kept fresh incrementally (issue 21).

:class:`AnnIndex` holds item id -> vector and answers ``topk(query, k)`` (ids and inner-product
scores) from a usearch HNSW graph (chosen by measurement over faiss-cpu's HNSW, which cannot
remove or replace an item: ``scripts/ann_compare.py``). Updates are incremental: an upsert adds
new items and replaces changed ones (remove + add, in place), a remove drops expired or deleted
items; nothing on the hot path rebuilds the graph.

Every deletion or replacement leaves the graph a little worse (its links were chosen for vectors
that are gone), so the index watches its quality: the churn since the last build, and the recall
of a few probe queries against an exact scan. When either crosses its limit, :meth:`rebuild`
builds a fresh graph from a snapshot of the vectors on a background thread, replays the ids
touched meanwhile, and swaps it in under the lock: queries never see a half-built graph.

Concurrency: usearch's Python calls release the GIL but share one search context, so every graph
call holds the index lock; updates take it per ``update_chunk`` items, after waiting queries.
``retrieval: exact`` scans the vectors instead (small catalogs, tests). Saving: ``ann_persist``.

``retrieval: ivf_sq8`` keeps an inverted file of 8-bit codes (:mod:`serving.ann_ivf`, faiss)
instead of the graph: it builds a million items in seconds, not tens of minutes, and at recall@100
0.97 answers in a fraction of the graph's time (``headwater bench retrieval``). A query takes
``rerank * k`` candidates from the codes and rescores them with the stored float32 vectors, so
order and scores are exact among the candidates. Below ``ivf_min_items`` items (too few to train
lists on) it scans the vectors; :meth:`AnnIndex.drift` asks for a build once there are enough,
and for a fresh one when the catalog has doubled since (more lists, centroids of today's items).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import ann_ivf
from serving.ann_config import AnnConfig
from serving.ann_vectors import VectorStore, ann_ids, ann_keys, check_items, check_query
from serving.metrics import ANN_GRAPH_UPDATES, ANN_REBUILDS

log = logging.getLogger(__name__)

__all__ = ["AnnConfig", "AnnIndex", "AnnStats"]

@dataclass(slots=True)
class AnnStats:
    """Counters of one index: items now, churn since the last build, builds, the last probe."""

    items: int = 0
    items_at_build: int = 0
    churn_since_build: int = 0
    builds: int = 0
    last_probe_recall: float | None = None
    rebuilding: bool = False
    last_build_s: float = 0.0
    drift_reason: str | None = None


class AnnIndex:
    """Item id -> vector with incremental upsert/remove and thread-safe top-k by inner product."""

    def __init__(self, cfg: AnnConfig) -> None:
        self.cfg = cfg
        self.store = VectorStore(cfg.dim)
        self.synced_version = -1  # the table version the contents reflect (serving.ann_feed)
        self.origin = "new"  # where the contents came from: new, loaded, rebuilt, source (serving.ann_persist)
        self._lock = threading.Lock()
        self._turn = threading.Condition()  # queries waiting for the lock go before the next update chunk
        self._queries_waiting = 0
        self._graph: Any = self._new_graph() if cfg.retrieval == "hnsw" else None
        self._touched: list[np.ndarray] | None = None  # ids changed while a rebuild runs
        self._rebuild_thread: threading.Thread | None = None
        self._maint_stop = threading.Event()
        self._maint: threading.Thread | None = None
        self._rng = np.random.default_rng(cfg.seed)
        self._stats = AnnStats()

    # ---- reads ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store)

    def stats(self) -> AnnStats:
        with self._lock:
            s = self._stats
            return AnnStats(len(self.store), s.items_at_build, s.churn_since_build, s.builds,
                            s.last_probe_recall, self._rebuild_thread is not None, s.last_build_s, s.drift_reason)

    def ids(self) -> np.ndarray:
        """The ids held now (a copy, in row order)."""
        with self._lock:
            ids, _, live, high = self.store.arrays()
            return ids[:high][live[:high]]

    def memory_bytes(self) -> int:
        """Bytes held: the graph (usearch's own figure) plus the vector store."""
        with self._lock:
            graph = int(self._graph.memory_usage) if self._graph is not None else 0
            return graph + self.store.nbytes

    def topk(self, query: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items with the largest ``<query, item>``: (ids int64, scores float32), best
        first; fewer when fewer items are held. Raises ``ValueError`` on a bad query or ``k``."""
        q = check_query(query, k, self.cfg.dim, self.cfg.max_k)
        with self._turn:
            self._queries_waiting += 1
        try:
            with self._lock:
                if self._graph is None:
                    ids, scores = self.store.topk(q, k)
                    return ids[0], scores[0]
                if self.cfg.retrieval == "ivf_sq8":
                    self._graph.nprobe = self.nprobe()
                    return ann_ivf.rescored_topk(self._graph, self.store, q, k, self.cfg.rerank)
                self._graph.expansion_search = max(self.cfg.expansion_search, k)
                m = self._graph.search(q, k, threads=1)
        finally:
            with self._turn:
                self._queries_waiting -= 1
                self._turn.notify_all()
        return ann_ids(m.keys), (1.0 - np.asarray(m.distances)).astype(np.float32)

    def exact_topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the stored vectors, for many queries: (ids [q, k], scores [q, k])."""
        q = np.ascontiguousarray(queries, np.float32).reshape(-1, self.cfg.dim)
        return self.store.topk(q, k)  # reads arrays that stay valid beside writers

    # ---- writes --------------------------------------------------------------------------------
    def upsert(self, ids: Any, vectors: Any) -> int:
        """Adds new items and replaces the vectors of known ones; returns how many changed (an
        item sent again with the same vector costs nothing). Ids repeated in one call: the last wins."""
        ids, vecs = check_items(ids, vectors, self.cfg.dim)
        with self._lock:  # items sent again unchanged skip the loop (a reconcile resends them all)
            keep = ~self.store.unchanged(ids, vecs)
        ids, vecs, changed = ids[keep], vecs[keep], 0
        for lo in range(0, ids.size, self.cfg.update_chunk):
            cid, cvec = ids[lo:lo + self.cfg.update_chunk], vecs[lo:lo + self.cfg.update_chunk]
            self._yield_to_queries()
            with self._lock:
                plan = self.store.upsert(cid, cvec)
                if self._graph is not None and (plan.added.size or plan.replaced.size):
                    if self.cfg.retrieval == "hnsw":
                        self._graph.expansion_add = self.cfg.expansion_add_live
                    self._graph_upsert(self._graph, plan.replaced, cid, cvec, np.concatenate([plan.added, plan.replaced]))
                self._stats.churn_since_build += int(plan.replaced.size)
                self._note_touched(np.concatenate([plan.added, plan.replaced]))
            changed += int(plan.added.size + plan.replaced.size)
        ANN_GRAPH_UPDATES.inc(changed if self._graph is not None else 0)
        return changed

    def remove(self, ids: Any) -> int:
        """Removes the given items (unknown ids are ignored); returns how many were held."""
        ids, gone = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1)), 0
        for lo in range(0, ids.size, 256):  # a removal only marks a node: microseconds each
            self._yield_to_queries()
            with self._lock:
                hit = self.store.remove(ids[lo:lo + 256])
                if self._graph is not None and hit.size:
                    self._graph.remove(ann_keys(hit))
                self._stats.churn_since_build += int(hit.size)
                self._note_touched(hit)
            gone += int(hit.size)
        return gone

    # ---- persistence (serving.ann_persist) -----------------------------------------------------
    def export_state(self, graph_path: str) -> tuple[np.ndarray, np.ndarray, bool, int]:
        """(ids, vectors, whether the graph was written to ``graph_path``, synced version), taken
        under the lock, so graph and vectors agree (queries wait for the graph's write)."""
        with self._lock:
            ids, vecs = self.store.snapshot()
            if self._graph is not None:
                self._graph.save(graph_path)
            return ids, vecs, self._graph is not None, self.synced_version

    def install(self, ids: np.ndarray, vecs: np.ndarray, graph: Any, synced_version: int = -1) -> None:
        """Replaces the contents with ``ids``/``vecs`` and ``graph`` (a usearch index over exactly
        them); with ``graph=None`` the graph (or the lists) is built here, on every core."""
        ids, vecs = check_items(ids, vecs, self.cfg.dim)
        store = VectorStore(self.cfg.dim, capacity=ids.size)
        store.upsert(ids, vecs)
        if self.cfg.retrieval != "exact" and graph is None:
            graph = self._build(ids, vecs, threads=max(self.cfg.build_threads, os.cpu_count() or 1))
            if graph is not None:  # ivf_sq8 below ivf_min_items builds nothing: it scans
                ANN_REBUILDS.labels(reason="load").inc()
        with self._lock:
            self.store, self._graph, self.synced_version = store, graph, synced_version
            self._stats.items_at_build, self._stats.churn_since_build = len(store), 0
            self._stats.builds += 1

    # ---- quality and rebuild -------------------------------------------------------------------
    def probe_recall(self) -> float | None:
        """Recall@``probe_k`` of a few probe queries (sums of two random items' vectors) against
        an exact scan; None for the exact index or an empty one."""
        if self._graph is None or len(self.store) == 0:
            return None
        with self._lock:
            a = self.store.sample(self.cfg.probe_queries, self._rng)
            b = self.store.sample(self.cfg.probe_queries, self._rng)
        queries = a + b
        k = min(self.cfg.probe_k, self.cfg.max_k)
        truth, _ = self.exact_topk(queries, k)
        found = [self.topk(q, k)[0] for q in queries]
        recall = float(np.mean([np.intersect1d(f, t).size / max(1, t.size) for f, t in zip(found, truth)]))
        with self._lock:
            self._stats.last_probe_recall = recall
        return recall

    def drift(self, probe: bool = True) -> str | None:
        """Why the graph should be rebuilt (``churn`` or ``recall``; ``ivf_sq8`` also ``untrained``:
        enough items to build lists on, ``growth``: the catalog outgrew its lists), or None."""
        if self.cfg.retrieval == "exact":
            return None
        with self._lock:
            s = self._stats
            churn = s.churn_since_build / max(1, s.items_at_build, len(self.store))
            n, untrained = len(self.store), self._graph is None
        reason = None
        if self.cfg.retrieval == "ivf_sq8" and (untrained or n >= self.cfg.ivf_regrow * max(1, s.items_at_build)):
            reason = ann_ivf.list_reason(n, untrained, self.cfg.ivf_min_items)
            with self._lock:
                self._stats.drift_reason = reason
            return reason
        if churn >= self.cfg.max_churn and s.churn_since_build > 0:
            reason = "churn"
        elif probe:
            recall = self.probe_recall()
            if recall is not None and recall < self.cfg.min_probe_recall:
                reason = "recall"
        with self._lock:
            self._stats.drift_reason = reason
        return reason

    def rebuild(self, reason: str = "manual", wait: bool = False) -> threading.Thread | None:
        """Builds a fresh graph from a snapshot on a background thread and swaps it in; returns
        the thread (None for the exact index, or the one already running)."""
        if self.cfg.retrieval == "exact":
            return None
        with self._lock:
            if self._rebuild_thread is not None:
                return self._rebuild_thread
            self._touched = []
            t = self._rebuild_thread = threading.Thread(target=self._rebuild, args=(reason,),
                                                        name="ann-rebuild", daemon=True)
        t.start()
        if wait:
            t.join()
        return t

    def start_maintenance(self, interval_s: float = 30.0) -> None:
        """Checks :meth:`drift` every ``interval_s`` and rebuilds in the background when it says so."""
        if self._maint is not None:
            return
        self._maint_stop.clear()

        def loop() -> None:
            while not self._maint_stop.wait(interval_s):
                try:
                    reason = self.drift()
                    if reason is not None:
                        self.rebuild(reason, wait=True)
                except Exception:  # a failed check must not end maintenance
                    log.exception("ann index maintenance failed")

        self._maint = threading.Thread(target=loop, name="ann-maintenance", daemon=True)
        self._maint.start()

    def stop(self) -> None:
        """Stops maintenance and waits for a running rebuild."""
        self._maint_stop.set()
        for t in (self._maint, self._rebuild_thread):
            if t is not None:
                t.join()
        self._maint = None

    # ---- internals -----------------------------------------------------------------------------
    def _build(self, ids: np.ndarray, vecs: np.ndarray, threads: int) -> Any:
        """A graph (or lists) over ``ids``/``vecs``; None for ``ivf_sq8`` below ``ivf_min_items``."""
        if self.cfg.retrieval == "ivf_sq8":
            if ids.size < self.cfg.ivf_min_items:
                return None
            return ann_ivf.build(ann_keys(ids), vecs, self.cfg.nlist, threads=threads, seed=self.cfg.seed)
        graph = self._new_graph()
        if ids.size:
            graph.add(ann_keys(ids), vecs, threads=threads)
        return graph

    def nprobe(self) -> int:
        """Lists an ``ivf_sq8`` query scans (:func:`serving.ann_ivf.nprobe_for`)."""
        return ann_ivf.nprobe_for(self._graph, self.cfg.nprobe, self.cfg.ivf_min_scan)

    def _new_graph(self) -> Any:
        from usearch.index import Index

        c = self.cfg
        return Index(ndim=c.dim, metric="ip", dtype="f32", connectivity=c.connectivity,
                     expansion_add=c.expansion_add, expansion_search=c.expansion_search)

    @staticmethod
    def _graph_upsert(graph: Any, present: np.ndarray, ids: np.ndarray, vecs: np.ndarray, which: np.ndarray) -> None:
        """Puts ``which`` (a subset of ``ids``) into ``graph`` with their vectors from ``vecs``;
        ``present`` ids are in the graph already and are removed first (usearch keys are unique)."""
        if present.size:
            graph.remove(ann_keys(present))
        if which.size:
            pos = np.flatnonzero(np.isin(ids, which))
            graph.add(ann_keys(ids[pos]), vecs[pos], threads=1)

    def _yield_to_queries(self) -> None:
        """Lets waiting queries take the lock first (for at most ``writer_yield_s``): a query
        should wait for at most the one update chunk already running, not a queue of them."""
        with self._turn:
            self._turn.wait_for(lambda: self._queries_waiting == 0, timeout=self.cfg.writer_yield_s)

    def _note_touched(self, ids: np.ndarray) -> None:
        if self._touched is not None and ids.size:
            self._touched.append(ids.copy())

    def _rebuild(self, reason: str) -> None:
        t0 = time.perf_counter()
        try:
            ids, vecs = self._snapshot()
            graph = self._build(ids, vecs, threads=self.cfg.build_threads)
            while True:  # replay the ids touched meanwhile, mostly outside the lock
                with self._lock:
                    touched, self._touched = self._touched or [], []
                    if sum(t.size for t in touched) <= self.cfg.update_chunk * 4:
                        self._replay(graph, touched)
                        self._graph, self._touched = graph, None
                        self._stats.items_at_build, self._stats.churn_since_build = len(self.store), 0
                        self._stats.builds += 1
                        self._stats.last_build_s = time.perf_counter() - t0
                        break
                self._replay(graph, touched, locked=False)
            ANN_REBUILDS.labels(reason=reason).inc()
            log.info("ann index rebuilt (%s): %d items in %.1f s", reason, ids.size, time.perf_counter() - t0)
        except Exception:
            log.exception("ann index rebuild (%s) failed; the old graph stays", reason)
            with self._lock:
                self._touched = None
        finally:
            with self._lock:
                self._rebuild_thread = None

    def _snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The live vectors, copied outside the lock (a rebuild must not stall queries for the
        copy). Rows written meanwhile may be torn or stale; their ids are touched, so the replay
        puts them right. An id seen twice (moved to another row meanwhile) is kept once."""
        with self._lock:
            all_ids, all_vecs, live, high = self.store.arrays()
        rows = np.flatnonzero(live[:high])
        ids, first = np.unique(all_ids[rows], return_index=True)
        rows = rows[first]
        vecs = np.empty((rows.size, self.cfg.dim), np.float32)
        for lo in range(0, rows.size, 65_536):  # chunks: a long numpy call would hold the GIL
            vecs[lo:lo + 65_536] = all_vecs[rows[lo:lo + 65_536]]
        return ids, vecs

    def _replay(self, graph: Any, touched: list[np.ndarray], locked: bool = True) -> None:
        """Brings ``graph`` (not yet serving) up to the store for ``touched`` ids."""
        if not touched or graph is None:
            return
        ids = np.unique(np.concatenate(touched))
        for lo in range(0, ids.size, self.cfg.update_chunk):
            part = ids[lo:lo + self.cfg.update_chunk]
            if locked:
                found, vecs = self.store.get(part)
            else:
                with self._lock:
                    found, vecs = self.store.get(part)
            in_graph = part[graph.contains(ann_keys(part))]
            if in_graph.size:
                graph.remove(ann_keys(in_graph))
            if found.any():
                graph.add(ann_keys(part[found]), vecs, threads=1)
