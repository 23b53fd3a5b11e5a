"""The online state a two-tower learner keeps beside its weights, all vectorised per batch.

- :class:`HistoryStore`: each user's last ``length`` clicked items with their event times, so a
  user vector at time ``t`` pools only clicks made before ``t`` (no look-ahead);
- :class:`ItemFeatureCache`: each item's latest item-side feature ids, so an item vector can be
  computed from an id alone (the role ``hw.items`` plays for serving);
- :class:`FrequencyEstimator`: the streaming estimate of each item's sampling probability of
  Yi et al. (RecSys 2019, "Sampling-bias-corrected neural modeling ...", Algorithm 2): per hashed
  item, the step it was last seen (A) and a moving average of the steps between sightings (B);
  ``q = 1 / B``.

Ragged bags become fixed-width padded matrices (:func:`padded`) with a mask, which is what the
towers pool.
"""

from __future__ import annotations

import numpy as np

from embedding_store.id_index import IdIndex
from hashing import splitmix64
from streams.example_batch import Ragged

__all__ = ["Padded", "padded", "bucket_ids", "HistoryStore", "ItemFeatureCache",
           "FrequencyEstimator"]

_NO_TIME = np.iinfo(np.int64).min

Padded = tuple[np.ndarray, np.ndarray]  # (ids int64[n, w], mask bool[n, w])


def padded(bag: Ragged | None, n: int, width: int) -> Padded:
    """``bag``'s rows as ``(ids[n, width], mask[n, width])``; longer rows keep their first ids."""
    ids, mask = np.zeros((n, width), np.int64), np.zeros((n, width), bool)
    if bag is None or len(bag.values) == 0:
        return ids, mask
    lengths = np.asarray(bag.lengths, np.int64)
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(row)) - np.repeat(bag.offsets[:-1], lengths)
    keep = pos < width
    ids[row[keep], pos[keep]] = bag.values[keep]
    mask[row[keep], pos[keep]] = True
    return ids, mask


def bucket_ids(ids: np.ndarray, slot: str, buckets: int) -> np.ndarray:
    """Stable hashed bucket of each id of ``slot`` (the slot salts the hash, so two slots' equal
    ids land apart)."""
    salt = np.uint64(sum((i + 1) * b for i, b in enumerate(slot.encode())) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        mixed = splitmix64(np.asarray(ids).astype(np.uint64) ^ (salt << np.uint64(32)))
    return (mixed % np.uint64(buckets)).astype(np.int64)


def _rows_for(index: IdIndex, keys: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Row of each key, adding the keys not yet indexed as rows ``size, size + 1, ...``."""
    rows = index.find(keys)
    if (rows < 0).any():
        new = np.unique(keys[rows < 0])
        index.insert(new, np.arange(size, size + len(new), dtype=np.int64))
        size += len(new)
        rows = index.find(keys)
    return rows, size


def _grown(a: np.ndarray, need: int, fill: int | bool) -> np.ndarray:
    if need <= a.shape[0]:
        return a
    out = np.full((max(need, 2 * a.shape[0]),) + a.shape[1:], fill, a.dtype)
    out[:a.shape[0]] = a
    return out


class HistoryStore:
    """Per user, the last ``length`` clicked items before a time (late clicks merge in order).

    It stores ``2 * length`` per user: a row reads the clicks before its own event time, and
    the clicks of its own batch that came after it (stored already) must not crowd out the
    earlier ones it may see.
    """

    def __init__(self, length: int, capacity: int = 1024) -> None:
        self.length = length
        self.kept = 2 * length
        self._index = IdIndex(capacity)
        self._size = 0
        self._users = np.zeros(capacity, np.int64)
        self._items = np.zeros((capacity, self.kept), np.int64)
        self._times = np.full((capacity, self.kept), _NO_TIME, np.int64)

    def __len__(self) -> int:
        return self._size

    def lookup(self, users: np.ndarray, time_ms: np.ndarray) -> Padded:
        """Each row's newest ``length`` clicks strictly before its ``time_ms``:
        ``(items[n, 2 * length], mask)``, oldest first."""
        users = np.asarray(users, np.int64)
        rows = self._index.find(users)
        known = rows >= 0
        items = np.zeros((len(users), self.kept), np.int64)
        mask = np.zeros((len(users), self.kept), bool)
        r = rows[known]
        items[known] = self._items[r]
        mask[known] = (self._times[r] != _NO_TIME) & (self._times[r] < np.asarray(time_ms)[known, None])
        newer = np.cumsum(mask[:, ::-1], axis=1)[:, ::-1]  # visible clicks at or after each column
        return items, mask & (newer <= self.length)

    def add(self, users: np.ndarray, items: np.ndarray, time_ms: np.ndarray) -> None:
        """Merges clicks into their users' histories, keeping each user's newest ``2 * length``."""
        if len(users) == 0:
            return
        rows, self._size = _rows_for(self._index, np.asarray(users, np.int64), self._size)
        self._users = _grown(self._users, self._size, 0)
        self._users[rows] = users
        self._items = _grown(self._items, self._size, 0)
        self._times = _grown(self._times, self._size, _NO_TIME)
        touched = np.unique(rows)
        old_t, old_i = self._times[touched].reshape(-1), self._items[touched].reshape(-1)
        owner = np.concatenate([np.repeat(touched, self.kept), rows])
        t = np.concatenate([old_t, np.asarray(time_ms, np.int64)])
        it = np.concatenate([old_i, np.asarray(items, np.int64)])
        valid = t != _NO_TIME
        owner, t, it = owner[valid], t[valid], it[valid]
        order = np.lexsort((t, owner))  # by owner, then time ascending (stable: arrival order)
        owner, t, it = owner[order], t[order], it[order]
        ends = np.searchsorted(owner, owner, side="right")
        from_end = ends - 1 - np.arange(len(owner))  # 0 = the newest of its owner
        keep = from_end < self.kept
        self._times[touched] = _NO_TIME
        self._items[touched] = 0
        slot = self.kept - 1 - from_end[keep]  # oldest left, newest in the last column
        self._times[owner[keep], slot] = t[keep]
        self._items[owner[keep], slot] = it[keep]


    def state(self) -> dict[str, np.ndarray]:
        """Every user's kept clicks, as arrays (the trainer's checkpoint)."""
        n = self._size
        return {"users": self._users[:n].copy(), "items": self._items[:n].copy(), "times": self._times[:n].copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        users = np.asarray(state["users"], np.int64)
        n = len(users)
        if state["items"].shape != (n, self.kept) or state["times"].shape != (n, self.kept):
            raise ValueError(f"history state must hold {self.kept} clicks per user")
        self._index = IdIndex(max(1024, 2 * n))
        self._index.insert(users, np.arange(n, dtype=np.int64))
        self._size = n
        self._users = users.copy()
        self._items = np.asarray(state["items"], np.int64).copy()
        self._times = np.asarray(state["times"], np.int64).copy()


class ItemFeatureCache:
    """Latest item-side feature ids per item (padded to ``width`` per slot), and every item seen."""

    def __init__(self, slots: tuple[str, ...], width: int, capacity: int = 1024) -> None:
        self.slots, self.width = slots, width
        self._index = IdIndex(capacity)
        self._size = 0
        self._ids = np.zeros(capacity, np.int64)
        self._feat = {s: (np.zeros((capacity, width), np.int64), np.zeros((capacity, width), bool))
                      for s in slots}

    def __len__(self) -> int:
        return self._size

    def ids(self) -> np.ndarray:
        """Every item seen so far, in first-seen order."""
        return self._ids[:self._size].copy()

    def observe(self, item_id: np.ndarray, sparse: dict[str, Ragged]) -> None:
        """Records the items of a batch's rows with their item-side features (last row wins)."""
        n = len(item_id)
        if n == 0:
            return
        # The last occurrence of each item in the batch: its newest features.
        _, last_rev = np.unique(np.asarray(item_id, np.int64)[::-1], return_index=True)
        last = n - 1 - last_rev
        keys = np.asarray(item_id, np.int64)[last]
        rows, self._size = _rows_for(self._index, keys, self._size)
        self._ids = _grown(self._ids, self._size, 0)
        self._ids[rows] = keys
        for s in self.slots:
            ids, mask = self._feat[s]
            ids, mask = _grown(ids, self._size, 0), _grown(mask, self._size, False)
            if s in sparse:
                p_ids, p_mask = padded(sparse[s].take(last), len(last), self.width)
                ids[rows], mask[rows] = p_ids, p_mask
            self._feat[s] = ids, mask

    def features(self, item_id: np.ndarray) -> dict[str, Padded]:
        """Per item slot, the items' feature ids (all masked for an item never seen)."""
        rows = self._index.find(np.asarray(item_id, np.int64))
        known = rows >= 0
        out = {}
        for s in self.slots:
            ids = np.zeros((len(rows), self.width), np.int64)
            mask = np.zeros((len(rows), self.width), bool)
            ids[known], mask[known] = self._feat[s][0][rows[known]], self._feat[s][1][rows[known]]
            out[s] = ids, mask
        return out


    def state(self) -> dict[str, np.ndarray]:
        """Every item's newest features, as arrays (the trainer's checkpoint)."""
        n = self._size
        out = {"ids": self._ids[:n].copy()}
        for s, (ids, mask) in self._feat.items():
            out[f"{s}.ids"], out[f"{s}.mask"] = ids[:n].copy(), mask[:n].copy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        ids = np.asarray(state["ids"], np.int64)
        n = len(ids)
        self._index = IdIndex(max(1024, 2 * n))
        self._index.insert(ids, np.arange(n, dtype=np.int64))
        self._size, self._ids = n, ids.copy()
        self._feat = {s: (np.asarray(state[f"{s}.ids"], np.int64).reshape(n, self.width).copy(),
                          np.asarray(state[f"{s}.mask"], bool).reshape(n, self.width).copy())
                      for s in self.slots}


class FrequencyEstimator:
    """Yi et al.'s streaming estimate of each item's probability of being in a training batch.

    Per hashed item: ``A`` the step it was last seen, ``B`` the moving average (rate ``alpha``)
    of the steps between its sightings, both starting at 0 as in the paper's Algorithm 2 (so a
    first sighting at step ``t`` gives ``B = alpha * t``); ``q = 1 / max(B, 1)``.
    """

    def __init__(self, buckets: int, alpha: float) -> None:
        self.buckets, self.alpha = buckets, alpha
        self._last = np.zeros(buckets, np.int64)
        self._gap = np.zeros(buckets, np.float64)

    def _buckets(self, item_id: np.ndarray) -> np.ndarray:
        return bucket_ids(item_id, "freq", self.buckets)

    def update(self, item_id: np.ndarray, step: int) -> None:
        """Records that ``item_id`` (duplicates count once) were in the batch of ``step``."""
        h = np.unique(self._buckets(item_id))
        self._gap[h] = (1 - self.alpha) * self._gap[h] + self.alpha * (step - self._last[h])
        self._last[h] = step

    def probability(self, item_id: np.ndarray) -> np.ndarray:
        """float64[n]: the estimated per-batch sampling probability of each item."""
        return 1.0 / np.maximum(self._gap[self._buckets(item_id)], 1.0)

    def state(self) -> dict[str, np.ndarray]:
        return {"last": self._last.copy(), "gap": self._gap.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._last = _same_shape(state["last"], self._last, np.int64)
        self._gap = _same_shape(state["gap"], self._gap, np.float64)


class CountEstimator:
    """The other streaming estimate: each item's share of the clicks trained, counts decayed by
    ``decay`` per step (lazily, per hashed item). Unlike the gap average, every step informs every
    item (an item no longer clicked fades), so it settles in fewer steps. ``q`` is the share;
    a constant factor (clicks per step) would shift every logit of a row alike.
    """

    def __init__(self, buckets: int, decay: float) -> None:
        self.buckets, self.decay = buckets, decay
        self._count = np.zeros(buckets, np.float64)
        self._last = np.zeros(buckets, np.int64)
        self._total, self._step = 0.0, 0

    def _buckets(self, item_id: np.ndarray) -> np.ndarray:
        return bucket_ids(item_id, "freq", self.buckets)

    def update(self, item_id: np.ndarray, step: int) -> None:
        """Adds one count per row of ``item_id`` at ``step`` (steps never go back)."""
        h, n = np.unique(self._buckets(item_id), return_counts=True)
        self._total = self._total * self.decay ** (step - self._step) + len(item_id)
        self._count[h] = self._count[h] * self.decay ** (step - self._last[h]) + n
        self._last[h], self._step = step, step

    def probability(self, item_id: np.ndarray) -> np.ndarray:
        """float64[n]: each item's decayed share of the clicks (at the last step)."""
        h = self._buckets(item_id)
        count = self._count[h] * self.decay ** (self._step - self._last[h])
        return np.maximum(count, 1e-3) / max(self._total, 1.0)

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self._count.copy(), "last": self._last.copy(),
                "total": np.array([self._total]), "step": np.array([self._step], np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self._count = _same_shape(state["count"], self._count, np.float64)
        self._last = _same_shape(state["last"], self._last, np.int64)
        self._total, self._step = float(state["total"][0]), int(state["step"][0])


def _same_shape(saved: np.ndarray, like: np.ndarray, dtype: type) -> np.ndarray:
    """``saved`` as ``dtype``; a checkpoint of another size is an error, not a silent resize."""
    if saved.shape != like.shape:
        raise ValueError(f"saved estimator state has shape {saved.shape}, this one {like.shape}")
    return np.asarray(saved, dtype).copy()
