"""Eviction keeps hot prefixes: least recently *used* first, and a chain's leaf before its root."""

from __future__ import annotations

from llm_engine.block_pool import BlockPool
from llm_engine.kv_cache import KVCacheManager
from llm_engine.sampling_params import SamplingParams
from llm_engine.sequence import Sequence

BS = 4


def _run(kv: KVCacheManager, name: str, tokens: list[int]) -> Sequence:
    """Admits ``tokens`` as a prompt (reusing cached blocks), computes it, caches and frees it."""
    seq = Sequence(name, tokens, SamplingParams())
    kv.admit_cached_prefix(seq)
    assert kv.allocate(seq, len(tokens) - seq.num_computed_tokens)
    seq.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(seq)
    kv.free(seq)
    return seq


def _cached(kv: KVCacheManager, tokens: list[int]) -> int:
    probe = Sequence("probe", tokens + [0], SamplingParams())
    kv.admit_cached_prefix(probe)
    n = probe.num_computed_tokens
    kv.free(probe)
    return n


def test_a_prefix_used_again_outlives_one_cached_earlier_but_not_used_since():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    user_a, user_b = list(range(100, 112)), list(range(200, 212))  # three blocks each
    _run(kv, "a1", user_a)
    _run(kv, "b1", user_b)
    assert _run(kv, "a2", user_a + [1, 2, 3, 4]).num_cached_tokens == 12  # A returns: a hit, and recent again
    held = pool.allocate(5)  # pressure: the never-used block, then the least recently used ones
    assert _cached(kv, user_a) == 12  # A's prefix survived
    assert _cached(kv, user_b) < 12  # B's went first
    pool.release(held)


def test_under_pressure_a_chain_loses_its_leaf_first_and_keeps_its_root():
    pool = BlockPool(4)
    kv = KVCacheManager(pool, BS)
    prefix = list(range(16))  # four blocks, the whole pool
    _run(kv, "p", prefix)
    held = pool.allocate(1)
    assert _cached(kv, prefix) == 12  # the last block went; the first three still hit
    pool.release(held)
