"""Count-min sketch admission: an id gets a row only after it was seen ``k`` times.

Rows are the expensive thing (value + optimizer state); a sketch of ``depth x width`` int32
counters bounds the memory spent on the long tail of ids seen once. The estimate never
under-counts, so an id is never admitted late by more than its hash collisions allow.

Counters age (TinyLFU-style): after ``decay_every`` sightings every counter is halved, so on an
endless stream of new ids the sketch does not fill up and admit more and more of the tail, and
an id must be seen ``k`` times *recently* to earn a row.
"""

from __future__ import annotations

import numpy as np

from hashing import splitmix64

_SEEDS = np.array(
    [0x8CB92BA72F3D8DD7, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3,
     0x589965CC75374CC3, 0x1D8E4E27C47D124F, 0x2545F4914F6CDD1D, 0x94D049BB133111EB],
    dtype=np.uint64,
)


class CountMinSketch:
    """``add(keys)`` counts sightings (duplicates in a batch count each time); ``estimate``."""

    def __init__(self, width: int = 1 << 20, depth: int = 4, decay_every: int | None = None) -> None:
        if not 1 <= depth <= len(_SEEDS):
            raise ValueError(f"depth must be in [1, {len(_SEEDS)}]")
        self.width = 1 << max(4, int(width - 1).bit_length())
        self.depth = depth
        self.counts = np.zeros((depth, self.width), dtype=np.int32)
        # Default: age once each column has seen about one sighting on average, which keeps
        # collisions from pushing unseen ids past small thresholds (k >= 2).
        self.decay_every = decay_every if decay_every is not None else self.width
        self._since_decay = 0

    def _cols(self, keys: np.ndarray) -> np.ndarray:
        k = keys.astype(np.uint64)
        mask = np.uint64(self.width - 1)
        return np.stack([(splitmix64(k ^ _SEEDS[d]) & mask).astype(np.int64) for d in range(self.depth)])

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Count the keys and return each one's new estimate."""
        cols = self._cols(keys)
        for d in range(self.depth):  # loop over the few rows of the sketch, not over ids
            np.add.at(self.counts[d], cols[d], 1)
        est = self.counts[np.arange(self.depth)[:, None], cols].min(axis=0)
        self._since_decay += int(keys.size)
        if self.decay_every and self._since_decay >= self.decay_every:
            self.counts >>= 1
            self._since_decay = 0
        return est

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        cols = self._cols(keys)
        return self.counts[np.arange(self.depth)[:, None], cols].min(axis=0)

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes)
