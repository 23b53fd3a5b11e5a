"""Deterministic 64-bit ids and sampling draws, identical in every process and on every replay."""

from __future__ import annotations

import hashlib

import numpy as np

from hashing import mix64

__all__ = ["example_ids", "keep_negative", "mix64", "request_hash", "row_example_ids"]


def request_hash(request_id: str) -> int:
    """A stable 64-bit hash of a request id (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def example_ids(request_id: str, items: np.ndarray) -> np.ndarray:
    """Deterministic int64 example ids of (request_id, item_id) pairs: the de-duplication key."""
    items = np.asarray(items, dtype=np.int64)
    return row_example_ids(items, np.full(len(items), request_hash(request_id), np.uint64))


def row_example_ids(items: np.ndarray, request_hashes: np.ndarray) -> np.ndarray:
    """:func:`example_ids` for many rows at once: each row's item with its request's
    :func:`request_hash` (uint64, one per row). The one definition of an example id."""
    h = mix64(np.asarray(items, dtype=np.int64).view(np.uint64))
    with np.errstate(over="ignore"):
        h = mix64(h ^ np.asarray(request_hashes, np.uint64))
    return h.view(np.int64)


def keep_negative(example_id: np.ndarray, rate: float) -> np.ndarray:
    """Deterministic downsampling draw: the same example is kept or dropped on every replay."""
    u = (mix64(np.asarray(example_id, np.int64).view(np.uint64) ^ np.uint64(0x5851F42D4C957F2D))
         >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < rate
