"""Recommend's retrieval stage: the top k items for a query vector, from the ANN index or a scan.

``retrieval`` (:class:`~serving.config.ServeConfig`): ``exact`` scans every item row
(:class:`serving.retrieval.ItemIndex`, synced before each query); ``ann`` answers from the HNSW
index (:mod:`serving.ann_index`); ``auto`` (the default) uses the ANN index once the item slot
holds ``ann_min_items`` rows (250k by default: at 200k dim-64 items a scan's p50 was 4.1 ms and
the index's 5.1 ms at ef 768 on 2 shared cores; the scan grows with the catalog, the index
barely). Below that the scan is as fast, and exact. Once built, the ANN index stays (a catalog
that shrinks does not flip back and forth).

Nothing is built or fed on a query's path. A query that sees the replica's table moved (a new
version, or a new table object from a snapshot) wakes one background sync (``serving.ann_feed``:
changed rows upserted, expired ids removed) and answers from the index as it is, so a new item's
first delta is retrievable once that sync ran, well within a second. The first build, or the load
of the saved index, runs on the same thread; until it is done queries take the exact scan and say
so (``candidate_source`` "exact"). The same thread checks the index's drift every
``drift_check_s`` and starts a background rebuild when it says so.

Persistence: the retriever is a companion of the replica's saved state
(:func:`serving.replica_persistence.attach`): each replica save writes the index to
``state_dir/ann`` (``serving.ann_persist``) when it changed and ``save_interval_s`` passed (a save
holds the index lock while usearch writes the graph: too costly every 10 s at a million items).
At start the saved index is loaded, then reconciled with the table, which touches the graph only
for rows that differ; an index that fails to load is rebuilt from the table (a log line and
``hw_serve_ann_load_failures``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving import metrics as m
from serving.ann_feed import sync_from_table, table_rows
from serving.ann_index import AnnConfig, AnnIndex
from serving.ann_persist import load_index, save_index
from serving.replica_persistence import attach
from serving.retrieval import ItemIndex

log = logging.getLogger(__name__)

__all__ = ["ItemRetriever", "Retrieved", "MODES"]

MODES = ("auto", "ann", "exact")


@dataclass(frozen=True, slots=True)
class Retrieved:
    """One call's candidates: ids best first, the stage that produced them (``ann`` or
    ``exact``) and the table version that stage reflected."""

    ids: np.ndarray
    source: str
    version: int


class ItemRetriever:
    """Top k item ids by inner product with a query, from the ANN index or an exact scan."""


    def __init__(self, mode: str = "auto", slot: str = "item_id", min_items: int = 250_000, max_k: int = 1000,
                 state_dir: str = "", save_interval_s: float = 300.0, drift_check_s: float = 30.0,
                 index: str = "ivf_sq8", name: str = "ann") -> None:
        if mode not in MODES:
            raise ValueError(f"retrieval: must be one of {MODES}, got {mode!r}")
        self.mode, self.slot, self.min_items, self.max_k = mode, slot, min_items, max_k
        self.save_interval_s, self.drift_check_s = save_interval_s, drift_check_s
        self.index = index  # serving.ann_config.RETRIEVAL_MODES: ivf_sq8 or hnsw
        self.name = name  # its directory under the replica's state_dir (one per retriever)
        self.exact = ItemIndex(slot)
        self.ann: AnnIndex | None = None
        self.loaded = False  # the ANN index came from the saved state (no build)
        self.dir = attach(Path(state_dir), self) if state_dir and mode != "exact" else None
        self._lock = threading.Lock()
        self._seen: tuple[Any, int] | None = None  # (table, version) the last query saw
        self._pending: Any = None  # the newest table the sync thread has yet to follow
        self._thread: threading.Thread | None = None
        self._last_drift = time.monotonic()
        self._last_save, self._saved_version = float("-inf"), None

    # ---- the query path ------------------------------------------------------------------------
    def retrieve(self, table: Any, query: torch.Tensor, k: int) -> Retrieved:
        """The ``k`` best items of ``table``'s item slot for ``query`` (fewer if fewer are held)."""
        if self.mode != "exact":
            self._notice(table)
            ann = self.ann
            if ann is not None:
                ids, _ = ann.topk(query, k)
                m.RETRIEVALS.labels(source="ann").inc()
                return Retrieved(ids, "ann", int(ann.synced_version))
        self.exact.sync(table)
        ids, _ = self.exact.topk(query, k)
        m.RETRIEVALS.labels(source="exact").inc()
        return Retrieved(ids, "exact", self.exact.version)

    def _notice(self, table: Any) -> None:
        """Wakes the sync thread when ``table`` moved since the last query (costs two compares
        when it did not)."""
        seen = self._seen
        if seen is not None and seen[0] is table and seen[1] == table.version:
            return
        self._seen = (table, table.version)
        with self._lock:
            self._pending = table
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ann-sync", daemon=True)
                self._thread.start()

    # ---- the sync thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                table, self._pending = self._pending, None
                if table is None:
                    self._thread = None
                    return
            try:
                self._follow(table)
            except Exception:  # the next table change tries again; queries go on meanwhile
                log.exception("ann retrieval: syncing the index failed")

    def _follow(self, table: Any) -> None:
        if self.ann is None:
            if self.mode == "auto" and table.ids(self.slot).size < self.min_items:
                return
            self.ann = self._first_index(table)
            self.exact = ItemIndex(self.slot)  # the scan's copy of the rows is no longer needed
        changed = sync_from_table(self.ann, table, self.slot)
        m.ANN_ITEMS.set(len(self.ann))
        if changed:
            log.debug("ann retrieval: %d items changed (version %d)", changed, self.ann.synced_version)
        if time.monotonic() - self._last_drift >= self.drift_check_s:
            self._last_drift = time.monotonic()
            reason = self.ann.drift()
            if reason is not None:
                self.ann.rebuild(reason)

    def _first_index(self, table: Any) -> AnnIndex:
        """The saved index (``state_dir/ann``) or one built from ``table``'s rows on every core."""
        # An IVF insert costs ~50 us: 16 per lock hold keep updates flowing (1 per hold capped
        # them at ~100-160/s); a graph insert costs a query's time, so one at a time.
        cfg = AnnConfig(dim=int(table.slots[self.slot].dim), max_k=self.max_k, retrieval=self.index,
                        update_chunk=16 if self.index == "ivf_sq8" else 1)
        t0 = time.perf_counter()
        if self.dir is not None:
            index = load_index(str(self.dir), cfg, rebuild_from=lambda: table_rows(table, self.slot))
            self.loaded = index.origin == "loaded"
        else:
            index = AnnIndex(cfg)
            index.install(*table_rows(table, self.slot), graph=None)
        log.info("ann retrieval: index %s, %d items in %.1f s", index.origin, len(index),
                 time.perf_counter() - t0)
        return index

    # ---- persistence (a companion of serving.replica_persistence) ------------------------------
    def save_beside(self, directory: Path) -> None:
        """Saves the index to ``directory`` when it changed and ``save_interval_s`` passed."""
        ann = self.ann
        if ann is None or ann.synced_version == self._saved_version:
            return
        if time.monotonic() - self._last_save < self.save_interval_s:
            return
        t0 = time.perf_counter()
        meta = save_index(ann, str(directory))
        self._last_save, self._saved_version = time.monotonic(), meta["synced_version"]
        log.info("ann index saved: %d items in %.1f s", meta["items"], time.perf_counter() - t0)

    def wait_synced(self, timeout_s: float) -> bool:
        """True once the sync thread is idle (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._thread is None:
                    return True
            time.sleep(0.01)
        return False
