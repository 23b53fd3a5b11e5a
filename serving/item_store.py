"""The newest item-side features per item, bounded, read a whole batch of candidates at a time.

:class:`ItemStore` is what :class:`serving.item_catalog.ItemCatalog` keeps from ``hw.items``:
per item id, a bag per item-side slot and the item-side dense tail, with the event time of the
features (an older message never overwrites a newer one). At most ``max_items`` items: past
that the least recently used (read or updated) items are evicted, counted in
``hw_serve_item_catalog_evictions_total``; an evicted item reads as unknown until it is
published again.

An unknown item reads as the trainer's "nothing known": an empty bag in every item-side slot and a
dense tail of ``(0.0, 1.0)`` per numeric column (value 0, missing indicator 1; the dense layout is
``(value, missing)`` pairs, see ``streams.log_schema``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from prometheus_client import Counter

from embedding_store.id_index import IdIndex
from streams.item_features import ItemFeatures

log = logging.getLogger(__name__)

__all__ = ["ItemStore", "ItemRows", "missing_tail", "CATALOG_REFUSED"]

CATALOG_EVICTIONS = Counter("hw_serve_item_catalog_evictions", "items evicted from a full item catalog")
CATALOG_REFUSED = Counter("hw_serve_item_catalog_refused", "hw.items messages not applied", ["reason"])


@dataclass
class ItemRows:
    """Catalog features of N candidate rows, in the order asked.

    ``sparse[slot]`` is a ragged pair (ids int64[m], lengths int64[N]); ``dense`` float32[N, w] the
    item-side dense tail (None when not asked for); ``known`` which items the catalog holds.
    """

    sparse: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: np.ndarray | None
    known: np.ndarray


def missing_tail(width: int) -> np.ndarray:
    """The dense tail of an unknown item: ``(0.0, 1.0)`` per ``(value, missing)`` pair."""
    tail = np.zeros(width, np.float32)
    tail[1::2] = 1.0
    return tail


class _Bags:
    """One slot's bags: row -> (start, length) into an append-only id buffer, compacted when more
    than half of it is garbage (a bag rewritten leaves its old ids behind)."""

    def __init__(self, capacity: int) -> None:
        self.start = np.zeros(capacity, np.int64)
        self.length = np.zeros(capacity, np.int64)
        self.values = np.zeros(1024, np.int64)
        self.used = 0
        self.live = 0

    def resize(self, capacity: int) -> None:
        for name in ("start", "length"):
            old = getattr(self, name)
            new = np.zeros(capacity, np.int64)
            new[:old.size] = old
            setattr(self, name, new)

    def put(self, row: int, ids: Sequence[int]) -> None:
        n = len(ids)
        self.live += n - int(self.length[row])
        if self.used > 2 * self.live + 4096:
            self._compact()
        if self.used + n > self.values.size:
            grown = np.zeros(max(2 * self.values.size, self.used + n), np.int64)
            grown[:self.used] = self.values[:self.used]
            self.values = grown
        self.values[self.used:self.used + n] = ids
        self.start[row], self.length[row] = self.used, n
        self.used += n

    def clear(self, rows: np.ndarray) -> None:
        self.live -= int(self.length[rows].sum())
        self.length[rows] = 0

    def gather(self, rows: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bags of ``rows`` (``known`` False: an empty bag) as (ids, lengths)."""
        lengths = np.where(known, self.length[rows], 0)
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, np.int64), lengths
        out_start = np.cumsum(lengths) - lengths
        at = np.repeat(self.start[rows] - out_start, lengths) + np.arange(total, dtype=np.int64)
        return self.values[at], lengths

    def _compact(self) -> None:
        rows = np.flatnonzero(self.length)
        values, lengths = self.gather(rows, np.ones(rows.size, bool))
        self.values = np.zeros(max(1024, 2 * values.size), np.int64)
        self.values[:values.size] = values
        self.start[rows] = np.cumsum(lengths) - lengths
        self.used = self.live = int(values.size)


class ItemStore:
    """The newest item-side features per item id, bounded, read a whole batch at a time.

    Not thread-safe on its own: :class:`ItemCatalog` serialises writers and readers with a lock.
    """

    def __init__(self, max_items: int = 1_000_000, max_ids_per_bag: int = 1000) -> None:
        if max_items <= 0:
            raise ValueError(f"max_items must be positive, got {max_items}")
        self.max_items = max_items
        self.max_ids_per_bag = max_ids_per_bag
        self._index = IdIndex(1024)
        cap = min(1024, max_items)
        self._item = np.zeros(cap, np.int64)  # row -> item id
        self._time = np.zeros(cap, np.int64)  # row -> event time of its features
        self._used = np.zeros(cap, np.int64)  # row -> last read or write (LRU clock; 0 = free)
        self._clock = 1
        self._rows = 0  # rows ever allocated; freed ones wait in _free
        self._free: list[int] = []
        self._bags: dict[str, _Bags] = {}
        self._dense = np.zeros((cap, 0), np.float32)
        self.dense_width = 0
        self.evicted = 0
        self._warned_s = float("-inf")

    def __len__(self) -> int:
        return len(self._index)

    @property
    def slots(self) -> frozenset[str]:
        """Every slot some item has a bag in (a model slot outside it is not item-side)."""
        return frozenset(self._bags)

    # -- writes ---------------------------------------------------------------------------------
    def apply(self, updates: Iterable[ItemFeatures]) -> int:
        """Applies messages (in topic order); older event times than an item's current ones are
        ignored, a tombstone removes the item. Returns how many were applied."""
        newest: dict[int, ItemFeatures] = {}
        for f in updates:
            cur = newest.get(f.item_id)
            if cur is None or f.event_time_ms >= cur.event_time_ms:
                newest[f.item_id] = f
        for f in list(newest.values()):
            if not f.tombstone and self._refused(f):
                del newest[f.item_id]
        if not newest:
            return 0
        items = np.fromiter(newest, np.int64, len(newest))
        feats = list(newest.values())
        rows = self._index.find(items)
        known = rows >= 0
        times = np.fromiter((f.event_time_ms for f in feats), np.int64, len(feats))
        current = known & (times >= self._time[np.where(known, rows, 0)])  # not older than held
        gone = np.fromiter((f.tombstone for f in feats), bool, len(feats))
        self._remove(items[current & gone])
        fresh = np.flatnonzero(~known & ~gone)
        if fresh.size > self.max_items:  # more new items in one batch than fit: keep the last
            fresh = fresh[-self.max_items:]
        rows[fresh] = self._allocate(items[fresh], protect=rows[current & ~gone])
        write = np.flatnonzero((current & ~gone) | ((rows >= 0) & ~known))
        for k in write:
            self._write(int(rows[k]), feats[k])
        return int(write.size + (current & gone).sum())

    def _refused(self, f: ItemFeatures) -> bool:
        if any(len(ids) > self.max_ids_per_bag for ids in f.sparse.values()):
            CATALOG_REFUSED.labels("bag_too_long").inc()
            log.warning("item %d: a bag over max_ids_per_bag=%d ids; not applied", f.item_id, self.max_ids_per_bag)
            return True
        if len(f.dense) != self.dense_width:
            # A schema change: the newest width wins; items not republished since read as missing.
            if len(self):
                log.warning("hw.items dense width changes from %d to %d (item %d)", self.dense_width,
                            len(f.dense), f.item_id)
            self.dense_width = len(f.dense)
            self._dense = np.tile(missing_tail(self.dense_width), (self._item.size, 1))
        return False

    def _write(self, row: int, f: ItemFeatures) -> None:
        for slot, bags in self._bags.items():
            if slot not in f.sparse:
                bags.clear(np.array([row]))
        for slot, ids in f.sparse.items():
            bags = self._bags.get(slot)
            if bags is None:
                bags = self._bags[slot] = _Bags(self._item.size)
            bags.put(row, ids)
        if len(f.dense) == self.dense_width:
            self._dense[row] = f.dense
        else:  # an older width, overtaken by a newer message of the same batch
            self._dense[row] = missing_tail(self.dense_width)
            CATALOG_REFUSED.labels("dense_width").inc()
        self._time[row] = f.event_time_ms
        self._used[row] = self._clock
        self._clock += 1

    def _remove(self, items: np.ndarray) -> None:
        if not items.size:
            return
        rows = self._index.remove(items)
        rows = rows[rows >= 0]
        self._free_rows(rows)

    def _free_rows(self, rows: np.ndarray) -> None:
        for bags in self._bags.values():
            bags.clear(rows)
        self._used[rows] = 0
        self._free.extend(rows.tolist())

    def _allocate(self, items: np.ndarray, protect: np.ndarray) -> np.ndarray:
        """Rows for new ``items``, each starting empty; when full, the least recently used items
        are evicted, never the rows in ``protect`` (updated by the same batch)."""
        n = items.size
        over = len(self) + n - self.max_items
        if over > 0:  # evict a little more than needed, so a full catalog does not sort per batch
            self._evict(over + self.max_items // 64, protect)
        take = min(n, len(self._free))
        rows = [self._free.pop() for _ in range(take)]
        if take < n:
            need = self._rows + n - take
            if need > self._item.size:
                self._grow(min(max(need, 2 * self._item.size), self.max_items))
            rows.extend(range(self._rows, self._rows + n - take))
            self._rows += n - take
        out = np.asarray(rows, np.int64)
        self._index.insert(items, out)
        self._item[out] = items
        return out

    def _evict(self, count: int, protect: np.ndarray) -> None:
        live = np.setdiff1d(np.flatnonzero(self._used[:self._rows] > 0), protect)
        if count <= 0 or not live.size:
            return
        count = min(count, live.size)
        oldest = live[np.argpartition(self._used[live], count - 1)[:count]]
        self._index.remove(self._item[oldest])
        self._free_rows(oldest)
        self.evicted += count
        CATALOG_EVICTIONS.inc(count)
        if time.monotonic() - self._warned_s > 60.0:  # a full catalog evicts every batch: warn once a minute
            self._warned_s = time.monotonic()
            log.warning("item catalog full (max_items=%d): evicting least recently used items (%d so "
                        "far); they read as unknown until republished", self.max_items, self.evicted)

    def _grow(self, capacity: int) -> None:
        for name in ("_item", "_time", "_used"):
            old = getattr(self, name)
            new = np.zeros(capacity, np.int64)
            new[:old.size] = old
            setattr(self, name, new)
        dense = np.tile(missing_tail(self.dense_width), (capacity, 1))
        dense[:self._dense.shape[0]] = self._dense
        self._dense = dense
        for bags in self._bags.values():
            bags.resize(capacity)

    # -- reads ----------------------------------------------------------------------------------
    def rows(self, items: np.ndarray, slots: Sequence[str], dense: bool) -> ItemRows:
        """The features of ``items`` (int64[N], repeats allowed) in ``slots``, and with ``dense``
        their dense tails; unknown items read as missing (see the module docstring)."""
        rows = self._index.find(np.ascontiguousarray(items, np.int64))
        known = rows >= 0
        at = np.where(known, rows, 0)
        self._used[rows[known]] = self._clock  # a read keeps an item in the catalog (LRU)
        self._clock += 1
        sparse = {}
        for slot in slots:
            bags = self._bags.get(slot)
            sparse[slot] = ((np.zeros(0, np.int64), np.zeros(items.size, np.int64)) if bags is None
                            else bags.gather(at, known))
        tail = None
        if dense:
            tail = self._dense[at]
            tail[~known] = missing_tail(self.dense_width)
        return ItemRows(sparse, tail, known)
