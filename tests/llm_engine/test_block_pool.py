"""KV block pool: refcounts, prefix-hash reuse, LRU eviction of unreferenced cached blocks."""

from __future__ import annotations

import pytest

from llm_engine.block_pool import BlockPool, chain_hash
from llm_engine.kv_cache import KVCacheManager
from llm_engine.sampling_params import SamplingParams
from llm_engine.sequence import Sequence


def test_allocate_release_and_exhaustion():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.peak_used == 3
    with pytest.raises(MemoryError):
        pool.allocate(2)
    pool.release(a)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError):
        pool.release(a[:1])


def test_cached_blocks_survive_release_until_evicted_lru():
    pool = BlockPool(3)
    b = pool.allocate(3)
    for blk, h in zip(b, (11, 22, 33)):
        pool.register(blk, h)
    pool.release([b[0]])
    pool.release([b[1]])  # freed later -> evicted later
    assert pool.lookup(11) == b[0] and pool.lookup(22) == b[1]
    pool.touch([b[1]])  # revived: refcount back to 1, out of the free list
    assert pool.num_free == 1
    (new,) = pool.allocate(1)  # evicts the least recently freed cached block
    assert new == b[0] and pool.lookup(11) is None and pool.lookup(22) == b[1]


def test_chain_hash_depends_on_prefix():
    assert chain_hash(None, [1, 2]) != chain_hash(chain_hash(None, [0, 0]), [1, 2])


def test_manager_reuses_shared_prefix_blocks():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, block_size=4)
    a = Sequence("a", list(range(10)), SamplingParams())
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)  # two full blocks registered
    b = Sequence("b", list(range(8)) + [99, 98, 97], SamplingParams())
    kv.admit_cached_prefix(b)
    assert b.num_computed_tokens == 8 and b.block_table == a.block_table[:2]
    assert pool.ref_cnt[a.block_table[0]] == 2
    c = Sequence("c", list(range(8)), SamplingParams())  # whole prompt cached: last token recomputed
    kv.admit_cached_prefix(c)
    assert c.num_computed_tokens == 7  # one shared block, then 3 tokens copied into a block of its own
    assert c.block_table[0] == a.block_table[0] and c.block_table[1] not in a.block_table
    assert kv.take_copies() == [(a.block_table[1], c.block_table[1], 3)]
    kv.free(a), kv.free(b), kv.free(c)
    assert pool.num_free == 16
