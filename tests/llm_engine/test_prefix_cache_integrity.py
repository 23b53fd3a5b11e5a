"""Prefix-cache integrity: a digest is an index key, never proof of content (vLLM CVE-2025-25183).

Weak hashers are injected through the pool's ``block_hasher`` (the same interface the engine's
blake2b hasher uses): every hit must still hold the request's exact prefix, so outputs equal an
uncached run and each refused hit is counted in ``pool.mismatches``.
"""

from __future__ import annotations

import pytest

from llm_engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams
from llm_engine.block_pool import BlockPool
from llm_engine.kv_cache import KVCacheManager
from llm_engine.prefix_hash import PrefixHasher, token_bytes
from llm_engine.ranking import score_sync
from llm_engine.scoring import ScoringOptions, plan_loglik
from llm_engine.sequence import Sequence
from llm_engine_helpers import drain, prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


class ConstantHasher:
    """Every block collides with every other."""

    root = b"root"

    def __call__(self, parent: bytes, tokens: bytes) -> bytes:
        return b"same"


class TokensOnlyHasher:
    """Ignores the parent: equal blocks after different prefixes collide (a broken chain)."""

    root = b"root"

    def __call__(self, parent: bytes, tokens: bytes) -> bytes:
        return tokens


WEAK = [ConstantHasher, TokensOnlyHasher]


def _computed(kv: KVCacheManager, seq_id: str, tokens: list[int]) -> Sequence:
    """A sequence whose tokens are all computed and whose full blocks are registered."""
    seq = Sequence(seq_id, tokens, SamplingParams())
    kv.allocate(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(seq)
    return seq


def test_digest_differs_across_model_namespaces():
    shape = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    base, other = ModelConfig(num_hidden_layers=2, **shape), ModelConfig(num_hidden_layers=3, **shape)
    block = token_bytes([1, 2, 3, 4])
    hashers = [PrefixHasher.for_model(base, weights="a"), PrefixHasher.for_model(other, weights="a"),
               PrefixHasher.for_model(base, weights="b"), PrefixHasher.for_model(base, weights="a", adapter="x"),
               PrefixHasher.for_model(base, weights="a", dtype="bfloat16")]
    digests = {h(h.root, block) for h in hashers}
    assert len(digests) == len(hashers)
    again = PrefixHasher.for_model(base, weights="a")
    assert again(again.root, block) == hashers[0](hashers[0].root, block)  # deterministic


def test_tokens_are_hashed_as_fixed_width_ints():
    h = PrefixHasher()
    assert len(token_bytes([1, 70000])) == 8
    assert h(h.root, token_bytes([1, 256])) != h(h.root, token_bytes([256, 1]))
    assert h(h(h.root, token_bytes([0, 0])), token_bytes([1, 2])) != h(h.root, token_bytes([1, 2]))


def test_colliding_digest_with_other_tokens_is_a_counted_miss():
    pool = BlockPool(16, block_hasher=ConstantHasher())
    kv = KVCacheManager(pool, block_size=4)
    _computed(kv, "a", list(range(1, 11)))
    b = Sequence("b", list(range(50, 61)), SamplingParams())
    kv.admit_cached_prefix(b)
    assert b.num_computed_tokens == 0 and not b.block_table
    assert pool.mismatches == 1 and pool.hits == 0


def test_equal_block_after_a_different_prefix_is_not_reused():
    pool = BlockPool(16, block_hasher=TokensOnlyHasher())
    kv = KVCacheManager(pool, block_size=4)
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    a = _computed(kv, "a", x + y)
    c = _computed(kv, "c", z + y)
    d = Sequence("d", z + y + [13], SamplingParams())
    kv.admit_cached_prefix(d)  # z hits; y's digest finds a's block, computed after x: refused
    assert a.block_table[1] not in d.block_table
    assert pool.mismatches == 1
    # c's y (unindexed: its digest collided) is found token by token under z and copied, not a's
    assert d.num_computed_tokens == 8 and kv.take_copies() == [(c.block_table[1], d.block_table[1], 4)]


def test_same_block_computed_twice_still_chains():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, block_size=4)
    _computed(kv, "a", list(range(1, 6)))  # indexes the first block
    b = _computed(kv, "b", list(range(1, 9)))  # computed alongside a: its first block is a duplicate
    c = Sequence("c", list(range(1, 10)), SamplingParams())
    kv.admit_cached_prefix(c)  # a's first block, then b's second (whose parent is b's duplicate)
    assert c.num_computed_tokens == 8 and c.block_table[1] == b.block_table[1]
    assert pool.mismatches == 0


def _uncached_greedy(path, ps: list[list[int]]) -> list[list[int]]:
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=False))
    for p in ps:
        eng.add_request(p, GREEDY)
    out = drain(eng)
    return [out[str(i)] for i in range(len(ps))]


def _shared_prefix_prompts() -> list[list[int]]:
    x, z = [1, 2, 3, 4], [9, 10, 11, 12]
    body = list(range(20, 40))
    # the last one starts like the third and continues like the first: a chain-breaking collision
    return [x + body + [5], x + body + [6, 7], z + [90, 91, 92, 93], z + body + [8]]


@pytest.mark.parametrize("hasher", WEAK, ids=lambda c: c.__name__)
def test_greedy_output_with_a_colliding_hasher_equals_an_uncached_run(tiny_llama, hasher):
    path, _ = tiny_llama
    ps = _shared_prefix_prompts() + prompts(3, 14)
    want = _uncached_greedy(path, ps)
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4))
    eng.pool.block_hasher = hasher()
    got = []
    for i, p in enumerate(ps):  # one at a time, so each finds the earlier ones' blocks cached
        eng.add_request(p, GREEDY, request_id=str(i))
        got.append(drain(eng)[str(i)])
    assert got == want
    assert eng.pool.mismatches > 0


@pytest.mark.parametrize("hasher", WEAK, ids=lambda c: c.__name__)
def test_batched_greedy_output_with_a_colliding_hasher_equals_an_uncached_run(tiny_llama, hasher):
    path, _ = tiny_llama
    ps = _shared_prefix_prompts() * 2 + prompts(4, 10)
    want = _uncached_greedy(path, ps)
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=16))
    eng.pool.block_hasher = hasher()
    for p in ps:
        eng.add_request(p, GREEDY)
    out = drain(eng)
    assert [out[str(i)] for i in range(len(ps))] == want
    assert eng.pool.mismatches > 0


@pytest.mark.parametrize("hasher", WEAK, ids=lambda c: c.__name__)
def test_rank_scores_with_a_colliding_hasher_equal_an_uncached_call(tiny_llama, hasher):
    path, _ = tiny_llama
    opts = ScoringOptions(normalize="sum")
    calls = [plan_loglik(list(range(1, 31)), [[40, 41], [42], [43, 44, 45]]),
             plan_loglik([9, 10, 11, 12] + list(range(5, 31)), [[40, 41], [46, 47]]),
             plan_loglik(list(range(60, 90)), [[40], [41, 42]])]
    eng = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4))
    eng.pool.block_hasher = hasher()
    for n, items in enumerate(calls):
        uncached = LLMEngine(path, EngineConfig(num_kv_blocks=64, block_size=4, enable_prefix_caching=False))
        want = score_sync(uncached, items, opts)
        got = score_sync(eng, items, opts, f"call{n}")
        assert got.scores == pytest.approx(want.scores, abs=1e-4)
        assert got.ranking == want.ranking
    assert eng.pool.mismatches > 0


def test_engine_namespaces_its_prefix_cache_by_model_and_dtype(tiny_llama):
    path, _ = tiny_llama
    a = LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=4, dtype="float32"))
    b = LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=4, dtype="float32"))
    c = LLMEngine(path, EngineConfig(num_kv_blocks=16, block_size=4, dtype="bfloat16"))
    assert a.pool.block_hasher.root == b.pool.block_hasher.root  # same model, same KV
    assert a.pool.block_hasher.root != c.pool.block_hasher.root  # other dtype, other KV
    assert a.pool.block_hasher.root != PrefixHasher().root  # not the empty namespace
