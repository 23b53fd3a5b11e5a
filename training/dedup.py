"""Bounded-memory de-duplication of example ids (the joiner may emit an example twice after a crash).

The window. Ids are kept in *generations* of ``capacity`` ids each; when the current generation
is full it is frozen and a new one starts, and only the newest ``generations`` are kept. So the
filter always remembers at least the last :attr:`SeenFilter.window` =
``capacity * (generations - 1)`` distinct ids it let through (and never more than about
``capacity * generations``: memory is bounded at ``8 * capacity * generations`` bytes). A copy of
an example that arrives within the window is dropped; a copy arriving after more than ``window``
other distinct examples may be trained again. Those ids are *forgotten*, and
:attr:`SeenFilter.forgotten` counts them, so a run can tell whether any could have slipped through.

Why the window suffices: a joiner re-emits only the output of its last uncommitted step (at most
``max_close_per_step`` requests, 20k by default), right after it restarts, and emits nothing while
it is down, so the copies follow the originals on ``hw.examples`` by far fewer examples than the
default window (2**20 ids, ``--dedup-capacity``).

Early emission (``join --emit early``) sends an example twice on purpose, as a negative and as
a positive copy; the copy has its own id (:func:`streams.join_build.positive_copy_ids`), so the
filter keeps both and drops only true re-emissions of either.

Durability: :meth:`SeenFilter.state` (the remembered ids plus the counters) is saved in every
trainer checkpoint and restored with it, so the window spans restarts: the filter and the
consumer offsets of a checkpoint always describe the same trained examples.

Ids live in sorted int64 arrays kept LSM-style (a new batch's ids become a small sorted run; runs
of similar size merge), so both the membership test and the insert are vectorised
``np.searchsorted`` / merge work, never a Python loop per id.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["SeenFilter"]

_STATS = "dedup.stats"  # int64[2]: duplicates dropped, ids forgotten (with the ids in a checkpoint)


def _contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool)
    pos = np.searchsorted(sorted_ids, ids)
    pos[pos == len(sorted_ids)] = 0
    return sorted_ids[pos] == ids


class SeenFilter:
    """Remembers the most recent ``window`` (at least) example ids; see the module docstring."""

    def __init__(self, capacity: int = 1 << 20, generations: int = 2) -> None:
        if capacity <= 0 or generations < 1:
            raise ValueError("capacity must be positive and generations >= 1")
        self.capacity = capacity
        self.generations = generations
        self.dropped = 0  # copies rejected (already seen, or repeated within one batch)
        self.forgotten = 0  # ids dropped from memory when a generation fell out of the window
        self._frozen: list[np.ndarray] = []  # oldest first, each sorted unique
        self._runs: list[np.ndarray] = []  # current generation: sorted runs, sizes non-increasing
        self._count = 0

    @property
    def window(self) -> int:
        """Distinct ids always remembered: a copy within this many examples is caught."""
        return self.capacity * (self.generations - 1)

    def __len__(self) -> int:
        return self._count + sum(len(g) for g in self._frozen)

    def seen(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: was each id already recorded? (does not record)"""
        ids = np.asarray(ids, np.int64)
        mask = np.zeros(len(ids), bool)
        for arr in (*self._frozen, *self._runs):
            mask |= _contains(arr, ids)
        return mask

    def filter_new(self, ids: np.ndarray) -> np.ndarray:
        """Mask of ids to keep: first occurrence in ``ids`` and not seen before. Records them."""
        ids = np.asarray(ids, np.int64)
        keep = np.zeros(len(ids), bool)
        if len(ids) == 0:
            return keep
        _, first = np.unique(ids, return_index=True)
        keep[first] = True
        keep &= ~self.seen(ids)
        self.dropped += len(ids) - int(keep.sum())
        self._add(np.sort(ids[keep]))
        return keep

    def _add(self, run: np.ndarray) -> None:
        if len(run) == 0:
            return
        self._runs.append(run)
        self._count += len(run)
        while len(self._runs) > 1 and len(self._runs[-1]) * 2 >= len(self._runs[-2]):
            b, a = self._runs.pop(), self._runs.pop()
            merged = np.concatenate([a, b])
            merged.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
            self._runs.append(merged)
        if self._count >= self.capacity:
            self._freeze()

    def _freeze(self) -> None:
        gen = np.concatenate(self._runs) if self._runs else np.zeros(0, np.int64)
        gen.sort(kind="stable")
        self._frozen.append(gen)
        before = sum(len(g) for g in self._frozen)
        self._frozen = self._keep_recent(self._frozen)
        gone = before - sum(len(g) for g in self._frozen)
        self.forgotten += gone
        self._runs, self._count = [], 0
        if gone:
            log.info("de-dup window rolled over: forgot the %d oldest ids (%d forgotten in all; "
                     "the last %d are remembered)", gone, self.forgotten, self.window)

    def _keep_recent(self, gens: list[np.ndarray]) -> list[np.ndarray]:
        keep = self.generations - 1
        return gens[-keep:] if keep else []

    def state(self) -> dict[str, np.ndarray]:
        """The remembered ids and the counters, as arrays (saved in the trainer's checkpoint)."""
        cur = np.sort(np.concatenate(self._runs)) if self._runs else np.zeros(0, np.int64)
        out = {f"dedup.frozen{i}": g for i, g in enumerate(self._frozen)}
        out["dedup.current"] = cur
        out[_STATS] = np.array([self.dropped, self.forgotten], np.int64)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        frozen_keys = sorted((k for k in state if k.startswith("dedup.frozen")),
                             key=lambda k: int(k[len("dedup.frozen"):]))
        frozen = [np.asarray(state[k], np.int64) for k in frozen_keys]
        self._frozen = self._keep_recent(frozen)
        cur = np.asarray(state.get("dedup.current", np.zeros(0, np.int64)), np.int64)
        self._runs = [cur] if len(cur) else []
        self._count = len(cur)
        stats = np.asarray(state.get(_STATS, np.zeros(2, np.int64)), np.int64)
        self.dropped, self.forgotten = int(stats[0]), int(stats[1])
        # A smaller window than the checkpoint's (fewer generations configured) forgets now.
        self.forgotten += sum(len(g) for g in frozen) - sum(len(g) for g in self._frozen)

    @staticmethod
    def ids_in_state(state: dict[str, np.ndarray]) -> np.ndarray:
        """Every id remembered in a :meth:`state` (sorted, unique): what a checkpoint has trained,
        within the window."""
        parts = [np.asarray(v, np.int64) for k, v in state.items()
                 if k.startswith("dedup.frozen") or k == "dedup.current"]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    @staticmethod
    def stats_in_state(state: dict[str, np.ndarray]) -> tuple[int, int]:
        """(duplicates dropped, ids forgotten) recorded in a :meth:`state` (0, 0 before they were)."""
        stats = state.get(_STATS)
        if stats is None:
            return 0, 0
        stats = np.asarray(stats, np.int64)
        return int(stats[0]), int(stats[1])
