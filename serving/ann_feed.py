"""Feeding an :class:`~serving.ann_index.AnnIndex` from the replica's table, one slot, by its
dirty tracking: only rows changed since the last sync are upserted and expired ids removed.

``hw.params`` deltas land in the replica's ``EmbeddingTable`` (``paramsync.ReplicaState``); the
table knows which rows changed after a version (``export_delta``), so :func:`sync_from_table`
costs nothing when nothing changed and O(changed rows) otherwise: the same contract as
``serving.retrieval.ItemIndex.sync``, without re-sorting a dense matrix. A *different* table
object (a new snapshot replaced the replica's table, or the process restarted and loaded a saved
index) is reconciled once in full: ids no longer in the table are removed and every row is
compared with the stored vector, so only rows that really differ touch the graph.
:func:`on_delta` applies one ``TableDelta`` directly, for a hook right after ``import_delta``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from serving.ann_index import AnnIndex

__all__ = ["on_delta", "sync_from_table", "table_rows"]

_lock = threading.Lock()
_last_table: "weakref.WeakKeyDictionary[AnnIndex, Any]" = weakref.WeakKeyDictionary()


def sync_from_table(index: AnnIndex, table: Any, slot: str = "item_id") -> int:
    """Brings ``index`` up to ``table``'s current version for ``slot``; returns the items that
    changed (upserted with a new vector, or removed)."""
    with _lock:  # one sync per index at a time; queries go on meanwhile
        ref = _last_table.get(index)
        same = ref is not None and ref() is table
        if same and table.version == index.synced_version:
            return 0
        changed = 0
        if not same:
            live = np.asarray(table.ids(slot), np.int64)
            ids = index.ids()
            changed += index.remove(ids[~np.isin(ids, live)])
        delta = table.export_delta(since_version=index.synced_version if same else -1, slots=[slot])
        changed += on_delta(index, delta, slot)
        index.synced_version = int(delta.to_version)  # a new table's versions restart the count
        _last_table[index] = weakref.ref(table)
        return changed


def on_delta(index: AnnIndex, delta: Any, slot: str = "item_id") -> int:
    """Applies one ``TableDelta``'s rows of ``slot`` (upserts, then expired ids); returns the
    items that changed. Sets ``index.synced_version`` to the delta's ``to_version``."""
    sd = delta.slots.get(slot)
    changed = 0
    if sd is not None:
        if sd.deleted_ids.size:
            changed += index.remove(sd.deleted_ids.astype(np.int64))
        if sd.ids.size:
            changed += index.upsert(sd.ids.astype(np.int64), sd.values.float())
    index.synced_version = max(index.synced_version, int(delta.to_version))
    return changed


def table_rows(table: Any, slot: str = "item_id") -> tuple[np.ndarray, Any]:
    """Every live (id, row) of ``slot``: what a first build (``AnnIndex.install``) starts from."""
    sd = table.export_delta(since_version=-1, slots=[slot]).slots[slot]
    return sd.ids.astype(np.int64), sd.values.float()
