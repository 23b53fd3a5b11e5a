"""Which shard owns an id: the one placement rule for trainer ranks and serving PS shards.

Row-wise sharding splits the id space by a hash of the id. The hash is deliberately a different
mixer (MurmurHash3's, :func:`hashing.fmix64`) from the one :mod:`embedding_store.id_index` uses
for slot placement: were they the same, every id in shard ``i`` of ``2**k`` shards would share its
low hash bits and fill only a fraction of each shard's index.
"""

from __future__ import annotations

import numpy as np

from hashing import fmix64

__all__ = ["shard_of"]


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard (``0..num_shards-1``, int64) of each int64 id; stable across processes and runs."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    x = fmix64(np.asarray(ids, dtype=np.int64))
    return (x % np.uint64(num_shards)).astype(np.int64)
