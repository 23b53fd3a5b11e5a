"""The last K versions a serving replica applied, and what it takes to go back to each of them.

A replica's table is updated in place by every ``hw.params`` delta, so an older version is not
kept as a copy. Instead, before a delta is applied, the rows it is about to change are read: their
values then (or "absent", for rows the delta creates) are the delta's *pre-images*. Going back
from version ``v`` to the version before it applies ``v``'s pre-images in reverse order; going
back further repeats that. Memory is therefore bounded by what changed over the kept versions
(about K sync intervals of deltas), not by K copies of the table.

The tower is replaced, never mutated, by a dense publish, so each kept version just references
the tower it was served with: distinct towers cost memory only once (a dense publish every
minute means a few towers for a few minutes of versions).

Each kept version also records ``next_offset``, the ``hw.params`` offset right after its last
message: reading on from there reproduces every later version exactly (rows are values), which
is how a pinned replica returns to the newest version (see :mod:`serving.version_pin`).

A full snapshot replaces the table, so the history restarts at the snapshot's version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embedding_store import SlotDelta, TableDelta

__all__ = ["HeldVersion", "VersionHistory", "pre_images"]

# An id no feature hash produces in practice; reading it returns the slot's default vector, the
# value an absent row reads as (``EmbeddingTable.lookup``).
_ABSENT_PROBE = np.iinfo(np.int64).min


def pre_images(table: Any, delta: TableDelta) -> TableDelta:
    """The current values of every row ``delta`` touches, as a delta that restores them: rows
    that read as the slot default (absent ones) come back as deletions, the rest as upserts."""
    slots: dict[str, SlotDelta] = {}
    for name, sd in delta.slots.items():
        ids = np.concatenate([sd.ids, sd.deleted_ids]).astype(np.int64, copy=False)
        if ids.size == 0:
            continue
        values = table.lookup(name, torch.from_numpy(ids)).cpu()  # (a GPU replica; no copy on the CPU)
        default = table.lookup(name, torch.tensor([_ABSENT_PROBE]))[0].cpu()
        # A live row equal to the default reads the same once deleted: deleting it is exact.
        absent = (values == default).all(dim=1).numpy()
        slots[name] = SlotDelta(ids=ids[~absent], values=values[torch.from_numpy(~absent)],
                                deleted_ids=ids[absent])
    return TableDelta(from_version=0, to_version=0, slots=slots)


def _nbytes(delta: TableDelta) -> int:
    return sum(sd.ids.nbytes + sd.deleted_ids.nbytes + sd.values.numel() * sd.values.element_size()
               for sd in delta.slots.values())


@dataclass
class HeldVersion:
    """One version a replica can go back to: its tower, watermark and where its messages end.
    ``undo`` are the pre-images that take the table from this version to the one before."""

    version: int
    watermark_ms: int
    tower: Any
    next_offset: int
    undo: list[TableDelta] = field(default_factory=list)
    undo_bytes: int = 0


class VersionHistory:
    """The newest ``max_versions`` versions (fewer while their undo logs exceed ``max_bytes``)."""

    def __init__(self, max_versions: int, max_bytes: int) -> None:
        if max_versions < 0 or max_bytes < 0:
            raise ValueError("max_versions and max_bytes must be >= 0")
        self.max_versions, self.max_bytes = max_versions, max_bytes
        self.entries: list[HeldVersion] = []
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_versions > 1

    @property
    def current(self) -> HeldVersion | None:
        return self.entries[-1] if self.entries else None

    def versions(self) -> list[int]:
        return [e.version for e in self.entries]

    def get(self, version: int) -> HeldVersion | None:
        return next((e for e in self.entries if e.version == version), None)

    def reset(self, version: int, watermark_ms: int, tower: Any, next_offset: int) -> None:
        """The table was replaced (a snapshot, a restore): history starts again at ``version``."""
        self.entries = [HeldVersion(int(version), int(watermark_ms), tower, int(next_offset))]
        self.bytes = 0

    def _entry(self, version: int) -> HeldVersion | None:
        """The entry messages of ``version`` belong to (a new one for a newer version)."""
        cur = self.current
        if cur is None:
            return None
        if version > cur.version:  # a lower version (another trainer rank's) joins the current
            cur = HeldVersion(int(version), cur.watermark_ms, cur.tower, cur.next_offset)
            self.entries.append(cur)
        return cur

    def before_rows(self, version: int, table: Any, delta: TableDelta) -> None:
        """Call before applying ``delta`` (published as ``version``) to ``table``."""
        if not self.enabled:
            return
        entry = self._entry(version)
        if entry is None:
            return
        undo = pre_images(table, delta)
        size = _nbytes(undo)
        entry.undo.append(undo)
        entry.undo_bytes += size
        self.bytes += size

    def after_message(self, version: int, watermark_ms: int, tower: Any, next_offset: int) -> None:
        """Call after a message of ``version`` was applied (offset ``next_offset - 1``)."""
        entry = self._entry(version)
        if entry is None:
            return
        entry.watermark_ms = max(entry.watermark_ms, int(watermark_ms))
        entry.tower, entry.next_offset = tower, int(next_offset)
        self._trim()

    def _trim(self) -> None:
        keep = max(self.max_versions, 1)
        while len(self.entries) > keep or (self.bytes > self.max_bytes and len(self.entries) > 1):
            self.entries.pop(0)
            oldest = self.entries[0]  # nothing older is held, so its undo is never needed again
            self.bytes -= oldest.undo_bytes
            oldest.undo, oldest.undo_bytes = [], 0

    def undo_to(self, table: Any, version: int) -> tuple[HeldVersion, list[HeldVersion]]:
        """Restores ``table``'s rows to ``version`` (which must be held); returns its entry and the
        newer entries undone (newest last), which are no longer held."""
        target = self.get(version)
        if target is None:
            raise KeyError(version)
        k = self.entries.index(target)
        undone = self.entries[k + 1:]
        for entry in reversed(undone):
            for delta in reversed(entry.undo):
                table.import_delta(delta)
            self.bytes -= entry.undo_bytes
        del self.entries[k + 1:]
        return target, undone
