"""Deterministic 64-bit ids and sampling draws, identical in every process and on every replay."""

from __future__ import annotations

import hashlib

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array: a cheap, well-spread 64-bit hash."""
    x = np.asarray(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def request_hash(request_id: str) -> int:
    """A stable 64-bit hash of a request id (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def example_ids(request_id: str, items: np.ndarray) -> np.ndarray:
    """Deterministic int64 example ids of (request_id, item_id) pairs: the de-duplication key."""
    h = mix64(np.asarray(items, dtype=np.int64).view(np.uint64))
    with np.errstate(over="ignore"):
        h = mix64(h ^ np.uint64(request_hash(request_id)))
    return h.view(np.int64)


def keep_negative(example_id: np.ndarray, rate: float) -> np.ndarray:
    """Deterministic downsampling draw: the same example is kept or dropped on every replay."""
    u = (mix64(np.asarray(example_id, np.int64).view(np.uint64) ^ np.uint64(0x5851F42D4C957F2D))
         >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < rate
