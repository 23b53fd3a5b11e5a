"""Ranking on the engine: context once through the prefix cache, same numbers as a full forward."""

from __future__ import annotations

import pytest
import torch

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.random_model import build_random_llama
from llm_engine.ranking import score_sync
from llm_engine.reference import ReferenceRunner
from llm_engine.scoring import ScoringOptions, plan_loglik, plan_yes_prob, score_items


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_llama(tmp_path_factory.mktemp("rank-llama"), max_positions=512)


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceRunner(model_dir)


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(model_dir, EngineConfig(num_kv_blocks=kw.pop("blocks", 128), **kw))


def _case(ctx_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(3, 380, (ctx_len,), generator=g).tolist()
    cands = [torch.randint(3, 380, (n,), generator=g).tolist() for n in (1, 3, 5, 2, 17, 8)]
    return ctx, cands


def _full(reference, items, opts):
    return score_items(items, reference.hidden_full, reference.model.lm_head.weight.detach(), opts)


@pytest.mark.parametrize("ctx_len", [5, 32, 45])  # shorter than a block, a block multiple, mid-block
def test_loglik_scores_match_a_full_forward_per_candidate(model_dir, reference, ctx_len):
    ctx, cands = _case(ctx_len)
    items = plan_loglik(ctx, cands)
    for opts in (ScoringOptions(normalize="sum"), ScoringOptions(normalize="mean")):
        got = score_sync(_engine(model_dir), items, opts)
        want = _full(reference, items, opts)
        assert got.scores == pytest.approx(want.scores, abs=1e-4)
        assert got.ranking == want.ranking


def test_yes_prob_scores_match_a_full_forward(model_dir, reference):
    ctx, cands = _case(40)
    items = plan_yes_prob(ctx, cands, [11, 12, 13], yes_id=20, no_id=21)
    opts = ScoringOptions(method="yes_prob")
    assert score_sync(_engine(model_dir), items, opts).scores == pytest.approx(_full(reference, items, opts).scores, abs=1e-5)


def test_cached_and_uncached_calls_give_the_same_scores(model_dir):
    ctx, cands = _case(70, seed=1)
    items = plan_loglik(ctx, cands)
    opts = ScoringOptions(normalize="sum")
    engine = _engine(model_dir)
    first = score_sync(engine, items, opts, "first")
    again = score_sync(engine, items, opts, "again")
    uncached = score_sync(_engine(model_dir, enable_prefix_caching=False), items, opts)
    assert first.cached_tokens > 0  # candidates reused the context's blocks
    assert again.scores == pytest.approx(first.scores, abs=1e-4)
    assert uncached.scores == pytest.approx(first.scores, abs=1e-4)
    assert uncached.cached_tokens == 0


def test_a_call_frees_every_block_it_used(model_dir):
    engine = _engine(model_dir)
    ctx, cands = _case(60)
    score_sync(engine, plan_loglik(ctx, cands), ScoringOptions())
    assert engine.pool.num_used == 0
    assert not engine.scheduler.running and len(engine.scheduler.waiting) == 0


def test_ranking_and_generation_share_one_engine_without_changing_generation(model_dir):
    prompts = [[5, 6, 7, 8, 9, 10], [20, 21, 22]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = _engine(model_dir)
    for i, p in enumerate(prompts):
        alone.add_request(p, params, request_id=f"g{i}")
    want = {}
    while alone.has_unfinished():
        for out in alone.step():
            if out.finished:
                want[out.request_id] = out.token_ids
    engine = _engine(model_dir)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"g{i}")
    ctx, cands = _case(50)
    box = []
    engine.scoring.submit("rank", plan_loglik(ctx, cands), ScoringOptions(), box.append)
    got = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
    assert got == want
    assert len(box) == 1 and len(box[0].scores) == len(cands)


def test_a_thousand_candidates_score_in_bounded_memory(model_dir):
    engine = _engine(model_dir, blocks=256, max_num_seqs=256, max_num_batched_tokens=2048)
    engine.scoring.max_chunk_elements = 4096  # at most ~10 rows of logits at a time
    ctx, _ = _case(20)
    g = torch.Generator().manual_seed(3)
    cands = torch.randint(3, 380, (1000, 2), generator=g).tolist()
    res = score_sync(engine, plan_loglik(ctx, cands), ScoringOptions(normalize="sum"))
    assert len(res.scores) == 1000 and sorted(res.ranking) == list(range(1000))
    assert all(s < 0 for s in res.scores)


def test_aborting_a_call_releases_its_blocks(model_dir):
    engine = _engine(model_dir)
    ctx, cands = _case(80)
    box = []
    engine.scoring.submit("r", plan_loglik(ctx, cands), ScoringOptions(), box.append)
    engine.step()
    assert engine.pool.num_used > 0
    engine.scoring.abort("r")
    assert engine.pool.num_used == 0 and not engine.scoring.active and not box
