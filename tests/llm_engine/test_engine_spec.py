"""Speculative decoding in the engine: greedy output identical, drafts verified in one pass."""

from __future__ import annotations

import pytest

from llm_engine import EngineConfig, LLMEngine, SamplingParams
from llm_engine.random_model import build_random_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_random_llama(tmp_path_factory.mktemp("spec-llama"), max_positions=512)


def _run(model_dir, prompts, params, **kw):
    engine = LLMEngine(model_dir, EngineConfig(num_kv_blocks=128, **kw))
    if engine.spec is not None:
        # A fixed cost model where drafts are cheap: whether drafts are tried must not depend on
        # how busy the test machine is (the adaptive rule itself is tested in test_spec.py).
        from llm_engine.spec import StepCostModel

        engine.spec.proposer.controller.cost = StepCostModel(fixed=1.0, per_token=1e-4, warmup=1 << 62)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    return engine, [outs[str(i)] for i in range(len(prompts))]


# Repetitive prompts: a random model falls into loops, which n-gram drafts then predict.
PROMPTS = [[10, 11, 12, 13, 14, 15] * 5, [40, 41, 42] * 8, [7, 8, 9, 100, 101, 102, 7, 8, 9]]


def test_greedy_output_is_identical_with_speculation(model_dir):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    _, plain = _run(model_dir, PROMPTS, params, speculative=False)
    engine, spec = _run(model_dir, PROMPTS, params, speculative=True)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 40 for o in spec)
    assert engine.spec.proposer.controller.total_proposed > 0
    assert engine.spec.acceptance_rate > 0
    assert engine.pool.num_used == 0


def test_speculation_respects_max_tokens_and_stop_tokens(model_dir):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    _, plain = _run(model_dir, PROMPTS[:1], params, speculative=False)
    stop = plain[0].token_ids[25]
    first = plain[0].token_ids.index(stop)
    p2 = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    _, spec = _run(model_dir, PROMPTS[:1], p2, speculative=True)
    assert spec[0].token_ids == plain[0].token_ids[: first + 1]
    _, short = _run(model_dir, PROMPTS[:1], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert short[0].token_ids == plain[0].token_ids[:7]


def test_sampled_requests_speculate_and_stay_reproducible(model_dir):
    params = SamplingParams(max_tokens=30, temperature=0.7, seed=5, ignore_eos=True)
    _, a = _run(model_dir, PROMPTS, params, speculative=True)
    _, b = _run(model_dir, PROMPTS, params, speculative=True)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 30 for o in a)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
])
def test_verification_uses_exactly_the_samplers_distribution(params):
    """Rejection sampling is lossless only against the distribution the sampler would draw from."""
    import numpy as np
    import torch

    from llm_engine.sampling import sample
    from llm_engine.spec.engine_hooks import target_probs

    logits = torch.tensor([[2.0, 1.5, 0.3, -0.2, 1.0, -1.0]])
    n = 6000
    res = sample(logits.expand(n, -1), [params] * n, list(range(n)), [0] * n)
    counts = np.bincount(res.token_ids.numpy(), minlength=6)
    p = target_probs(logits, params)[0].numpy()
    assert counts[p == 0].sum() == 0
    expected = n * p[p > 0]
    chi2 = float((((counts[p > 0] - expected) ** 2) / expected).sum())
    assert chi2 < 30.0
