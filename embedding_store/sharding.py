"""Which shard owns an id: the one placement rule for trainer ranks and serving PS shards.

Row-wise sharding splits the id space by a hash of the id. The hash is deliberately a different
mixer (MurmurHash3's fmix64) from the one :mod:`embedding_store.id_index` uses for slot placement:
were they the same, every id in shard ``i`` of ``2**k`` shards would share its low hash bits and
fill only a fraction of each shard's index.
"""

from __future__ import annotations

import numpy as np

__all__ = ["shard_of"]

_C1, _C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard (``0..num_shards-1``, int64) of each int64 id; stable across processes and runs."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= _C1
        x ^= x >> np.uint64(33)
        x *= _C2
        x ^= x >> np.uint64(33)
    return (x % np.uint64(num_shards)).astype(np.int64)
