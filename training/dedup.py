"""Bounded-memory de-duplication of example ids (the joiner may emit an example twice after a crash).

Ids live in sorted int64 arrays kept LSM-style (a new batch's ids become a small sorted run; runs
of similar size merge), so both the membership test and the insert are vectorised
``np.searchsorted`` / merge work, never a Python loop per id. When the current generation holds
``capacity`` ids it is frozen and a new one starts; only the newest ``generations`` generations
are kept. Duplicates arrive close together (a replayed joiner window), so forgetting ids older
than ``capacity * (generations - 1)`` examples costs nothing in practice and bounds memory at
``8 * capacity * generations`` bytes. The state is plain arrays, saved with each checkpoint.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SeenFilter"]


def _contains(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), bool)
    pos = np.searchsorted(sorted_ids, ids)
    pos[pos == len(sorted_ids)] = 0
    return sorted_ids[pos] == ids


class SeenFilter:
    """Remembers the most recent ~``capacity * generations`` example ids."""

    def __init__(self, capacity: int = 1 << 20, generations: int = 2) -> None:
        if capacity <= 0 or generations < 1:
            raise ValueError("capacity must be positive and generations >= 1")
        self.capacity = capacity
        self.generations = generations
        self._frozen: list[np.ndarray] = []  # oldest first, each sorted unique
        self._runs: list[np.ndarray] = []  # current generation: sorted runs, sizes non-increasing
        self._count = 0

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
        self._frozen = self._keep_recent(self._frozen)
        self._runs, self._count = [], 0

    def _keep_recent(self, gens: list[np.ndarray]) -> list[np.ndarray]:
        keep = self.generations - 1
        return gens[-keep:] if keep else []

    def state(self) -> dict[str, np.ndarray]:
        cur = np.sort(np.concatenate(self._runs)) if self._runs else np.zeros(0, np.int64)
        out = {f"dedup.frozen{i}": g for i, g in enumerate(self._frozen)}
        out["dedup.current"] = cur
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        frozen_keys = sorted((k for k in state if k.startswith("dedup.frozen")),
                             key=lambda k: int(k[len("dedup.frozen"):]))
        self._frozen = self._keep_recent([np.asarray(state[k], np.int64) for k in frozen_keys])
        cur = np.asarray(state.get("dedup.current", np.zeros(0, np.int64)), np.int64)
        self._runs = [cur] if len(cur) else []
        self._count = len(cur)
