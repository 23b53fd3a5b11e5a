"""64-bit mixers: SplitMix64's (example ids, sampling draws, admission sketches, synthetic
weights) and MurmurHash3's (the shard rule).

Neutral (no internal dependencies), so that ``streams``, ``embedding_store`` and ``training`` share
one copy without importing each other. Outputs are a contract: example ids, negative-sampling
draws, shard placement and the count-min sketches saved in snapshots depend on them bit for bit.
(The feature-id hash of log values is another one, ``xxh64``, in :mod:`streams.log_schema`.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["GOLDEN", "fmix64", "mix64", "splitmix64"]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: SplitMix64's increment
_SPLITMIX = (30, np.uint64(0xBF58476D1CE4E5B9), 27, np.uint64(0x94D049BB133111EB), 31)
_MURMUR = (33, np.uint64(0xFF51AFD7ED558CCD), 33, np.uint64(0xC4CEB9FE1A85EC53), 33)


def _finalise(z: np.ndarray, s1: int, m1: np.uint64, s2: int, m2: np.uint64, s3: int) -> np.ndarray:
    """Xor-shift, multiply, xor-shift, multiply, xor-shift, in place on a uint64 array (wrapping)."""
    with np.errstate(over="ignore"):
        z ^= z >> np.uint64(s1)
        z *= m1
        z ^= z >> np.uint64(s2)
        z *= m2
        z ^= z >> np.uint64(s3)
    return z


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over an int64/uint64 array -> uint64: a cheap, well-spread 64-bit
    hash (a bijection; ``mix64(0) == 0``)."""
    return _finalise(np.asarray(x).astype(np.uint64, copy=True), *_SPLITMIX)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output for state ``x``: ``mix64(x + GOLDEN)`` (wrapping), so that zero and
    keys that agree in their low bits still spread (a full avalanche)."""
    z = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += GOLDEN
    return _finalise(z, *_SPLITMIX)


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser -> uint64; deliberately not SplitMix64's (see
    :mod:`embedding_store.sharding`)."""
    return _finalise(np.asarray(x).astype(np.uint64, copy=True), *_MURMUR)
