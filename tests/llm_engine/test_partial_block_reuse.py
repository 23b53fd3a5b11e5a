"""Token-granular prefix reuse: past the last cached full block, the leading tokens a cached block
shares with a request are copied into a block of the request's own, never shared, and the
results equal an uncached run.

Blocks are 16 tokens; a 53-token context (3 full blocks + 5 tokens) leaves a partial last block.
"""

from __future__ import annotations

import pytest
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.block_pool import BlockPool
from llm_engine.kv_cache import KVCacheManager
from llm_engine.prefix_hash import token_bytes
from llm_engine.random_model import build_random_llama
from llm_engine.ranking import score_sync
from llm_engine.scoring import ScoreResult, ScoringOptions, plan_loglik
from llm_engine.sequence import Sequence
from llm_engine_helpers import drain

BS = 16
CTX = 3 * BS + 5  # a context whose last block is partial
OPTS = ScoringOptions(normalize="sum")
TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_llama(tmp_path_factory.mktemp("partial-llama"), max_positions=512)


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(model_dir, EngineConfig(num_kv_blocks=kw.pop("blocks", 128), block_size=BS, device="cpu", **kw))


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 380, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CANDS = [_tokens(n, 100 + n) for n in (1, 3, 9, 2, 20)]


def _score(eng: LLMEngine, ctx: list[int], rid: str) -> ScoreResult:
    return score_sync(eng, plan_loglik(ctx, CANDS), OPTS, rid)


def _assert_same_numbers(got: ScoreResult, want: ScoreResult) -> None:
    assert got.scores == pytest.approx(want.scores, abs=TOL)
    for a, b in zip(got.token_logprobs, want.token_logprobs):
        assert a == pytest.approx(b, abs=TOL)


def _uncached(model_dir, ctx: list[int]) -> ScoreResult:
    return _score(_engine(model_dir, enable_prefix_caching=False), ctx, "uncached")


def _record_copies(eng: LLMEngine) -> list[tuple[int, int, int, torch.Tensor]]:
    """Records the token copies the runner makes, with each source block's K/V at that moment
    (a pass-through wrapper)."""
    seen, copy = [], eng.runner.copy_tokens

    def recorded(copies):
        seen.extend((src, dst, k, eng.runner.kv_cache[:, :, src].clone()) for src, dst, k in copies)
        return copy(copies)
    eng.runner.copy_tokens = recorded
    return seen


def test_an_extended_context_reuses_the_previous_context_s_partial_block(model_dir):
    ctx = _tokens(CTX, 1)
    ext = ctx + _tokens(4, 2)
    eng = _engine(model_dir)
    _score(eng, ctx, "first")
    got = _score(eng, ext, "ext")
    assert got.context_cached_tokens == CTX  # 3 full blocks shared, the 5 partial tokens copied
    _assert_same_numbers(got, _uncached(model_dir, ext))
    assert eng.pool.num_used == 0 and sum(eng.pool.ref_cnt) == 0  # copies hold no reference


def test_the_switch_off_reuses_full_blocks_only(model_dir):
    ctx = _tokens(CTX, 1)
    ext = ctx + _tokens(4, 2)
    eng = _engine(model_dir, enable_partial_block_reuse=False)
    _score(eng, ctx, "first")
    got = _score(eng, ext, "ext")
    assert got.context_cached_tokens == 3 * BS and eng.pool.partial_hits == 0
    _assert_same_numbers(got, _uncached(model_dir, ext))


@pytest.mark.parametrize("diverge", [50, 40], ids=["inside-the-partial-block", "inside-a-full-block"])
def test_a_context_diverging_inside_a_block_reuses_only_the_common_prefix(model_dir, diverge):
    ctx = _tokens(CTX, 1)
    tail = _tokens(12, 3)
    tail[0] = ctx[diverge] % 370 + 4  # differs from the cached token there
    other = ctx[:diverge] + tail
    eng = _engine(model_dir)
    _score(eng, ctx, "first")
    got = _score(eng, other, "other")
    assert got.context_cached_tokens == diverge
    _assert_same_numbers(got, _uncached(model_dir, other))


def test_a_source_block_is_only_read(model_dir):
    ctx = _tokens(CTX, 1)
    eng = _engine(model_dir)
    first = _score(eng, ctx, "first")
    before = eng.runner.kv_cache.clone()
    copies = _record_copies(eng)
    _score(eng, ctx + _tokens(4, 2), "ext")
    # the first call's partial block lent its 5 tokens to the new context (whose own partial
    # block, once computed, lent those to the candidates)
    assert any(k == 5 and torch.equal(at, before[:, :, src]) for src, _, k, at in copies)
    kv = eng.runner.kv_cache
    for src, dst, k, at in copies:
        assert dst != src
        assert torch.equal(kv[:, :, src], at)  # a source is never written after it lends
        assert torch.equal(kv[:, :, dst, :k], at[:, :, :k])  # and the copy is exact
    again = _score(eng, ctx, "again")  # replayed: the partial block lends all but the last token
    assert again.context_cached_tokens == CTX - 1
    _assert_same_numbers(again, first)


def test_a_mismatching_token_ends_the_reuse_even_if_later_tokens_match(model_dir):
    ctx = _tokens(CTX, 1)
    eng = _engine(model_dir)
    _score(eng, ctx, "first")
    swapped = list(ctx)
    swapped[49] = ctx[49] % 370 + 4  # one token differs; those after it equal the cached ones
    got = _score(eng, swapped + _tokens(4, 2), "swapped")
    assert got.context_cached_tokens == 49
    _assert_same_numbers(got, _uncached(model_dir, swapped + _tokens(4, 2)))
    # the partial block's tokens after a different full block: keyed by its parent, not reused
    moved = ctx[:32] + _tokens(16, 4) + ctx[48:] + _tokens(4, 2)
    got = _score(eng, moved, "moved")
    assert got.context_cached_tokens == 32
    _assert_same_numbers(got, _uncached(model_dir, moved))


def test_the_manager_copies_a_verified_token_prefix_only():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, BS // 4)
    a = Sequence("a", [1, 2, 3, 4, 5, 6, 7], SamplingParams())  # one full block, then 3 tokens
    kv.allocate(a, 7)
    a.num_computed_tokens = 7
    kv.cache_full_blocks(a)
    partial = a.block_table[1]
    kv.free(a)
    assert pool.block_tokens[partial] == token_bytes([5, 6, 7]) and pool.content_id[partial] is None
    b = Sequence("b", [1, 2, 3, 4, 5, 9, 7, 8], SamplingParams())  # 6 differs, 7 equal again
    kv.admit_cached_prefix(b)
    assert b.num_computed_tokens == 5 and kv.take_copies() == [(partial, b.block_table[1], 1)]
    c = Sequence("c", [4, 3, 2, 1, 5, 6, 7, 8], SamplingParams())  # same tokens after another block
    kv.admit_cached_prefix(c)
    assert c.num_computed_tokens == 0 and kv.take_copies() == []
    kv.admit_cached_prefix(b2 := Sequence("b2", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams()))
    own = b2.block_table[1]
    kv.free(b2)  # freed before its planned copy was made: its block must not claim those tokens
    assert pool.block_tokens[own] is None and pool.block_tokens[partial] == token_bytes([5, 6, 7])
    kv.free(b)
    assert pool.num_free == 16 and sum(pool.ref_cnt) == 0


def test_a_source_allocated_again_before_the_copy_still_lends_its_tokens(model_dir):
    prompt = _tokens(CTX, 1)
    params = SamplingParams(max_tokens=2, temperature=0, logprobs=3, ignore_eos=True)
    eng = _engine(model_dir, blocks=32, speculative=False)
    eng.add_request(prompt, SamplingParams(max_tokens=2, temperature=0), request_id="a")
    a_out = drain(eng)["a"]  # its full blocks are cached after its prefill step, then one decode
    pool = eng.pool
    cached = prompt[3 * BS:] + a_out[:1]  # the K/V of its last, partial block
    src = next(b for b in range(pool.num_blocks) if pool.block_tokens[b] == token_bytes(cached))
    # LRU order: some uncached block, then the source; the request below takes the first as its
    # own block and the source for its next tokens, which its forward then writes
    pool.free.move_to_end(src, last=False)
    spare = next(b for b in pool.free if pool.block_tokens[b] is None)
    pool.free.move_to_end(spare, last=False)
    longer = prompt + _tokens(20, 5)
    assert longer[CTX] != a_out[0]  # so 5 of the source's 6 tokens are reused
    eng.add_request(longer, params, request_id="b")
    first = eng.step()
    seq = eng.requests["b"]
    assert seq.num_cached_tokens == CTX and seq.block_table[3:5] == [spare, src]
    outs = {o.request_id: o for o in first}
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step()})
    plain = _engine(model_dir, enable_prefix_caching=False, speculative=False)
    plain.add_request(longer, params, request_id="b")
    while plain.has_unfinished():
        for o in plain.step():
            want = o
    assert outs["b"].token_ids == want.token_ids
    for got_lp, want_lp in zip(outs["b"].logprobs, want.logprobs):
        assert got_lp.keys() == want_lp.keys()
        assert list(got_lp.values()) == pytest.approx(list(want_lp.values()), abs=TOL)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_requests_with_copied_tokens_give_the_uncached_output(model_dir, mode):
    base = _tokens(CTX, 1)
    ps = [base + _tokens(3 + i, 10 + i) for i in range(5)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    roomy = _engine(model_dir, enable_prefix_caching=False, speculative=False)
    for i, p in enumerate(ps):
        roomy.add_request(p, params, request_id=str(i))
    want = drain(roomy)
    eng = _engine(model_dir, blocks=10, speculative=False, preemption_mode=mode, num_swap_blocks=64)
    eng.add_request(base, params, request_id="warm")
    drain(eng)
    for i, p in enumerate(ps):
        eng.add_request(p, params, request_id=str(i))
    assert drain(eng) == want
    assert eng.scheduler.num_preemptions > 0 and eng.pool.partial_hits > 0
    assert sum(eng.pool.ref_cnt) == 0 and eng.pool.num_used == 0
