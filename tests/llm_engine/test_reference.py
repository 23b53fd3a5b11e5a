"""The transformers reference runner: shared-prefix scoring and speculative generation are exact."""

from __future__ import annotations

import pytest
import torch

from llm_engine.reference import ReferenceRunner, Sampling, process_logits
from llm_engine.scoring import ScoringOptions, plan_loglik, plan_yes_prob, score_items
from llm_engine.spec import SpecConfig
from llm_engine.random_model import build_random_llama


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return ReferenceRunner(build_random_llama(tmp_path_factory.mktemp("tiny-ref")))


def test_shared_prefix_scores_equal_full_forward_scores(runner):
    torch.manual_seed(0)
    ctx = torch.randint(3, 380, (37,)).tolist()
    cands = [torch.randint(3, 380, (n,)).tolist() for n in (1, 4, 7, 2, 5)]
    weight = runner.model.lm_head.weight.detach()
    for items, opts in [(plan_loglik(ctx, cands), ScoringOptions(normalize="sum")),
                        (plan_yes_prob(ctx, cands, [5, 6], 7, 8), ScoringOptions(method="yes_prob"))]:
        full = score_items(items, runner.hidden_full, weight, opts)
        shared = score_items(items, lambda it: runner.hidden_shared_prefix(it, batch=2), weight, opts)
        assert shared.scores == pytest.approx(full.scores, abs=1e-4)
        assert shared.ranking == full.ranking


def test_speculative_greedy_generation_is_identical_to_plain(runner):
    prompt = [10, 11, 12, 13, 14, 15] * 5
    plain = [t for o in runner.generate(prompt, 40) for t in o.token_ids]
    outs = list(runner.generate(prompt, 40, spec=SpecConfig(probe_interval=1)))
    assert [t for o in outs for t in o.token_ids] == plain
    assert sum(o.drafted for o in outs) > 0


def test_seeded_sampling_with_speculation_reproduces_itself(runner):
    prompt = [10, 11, 12, 13] * 6
    s = Sampling(temperature=0.8, top_k=50, seed=3)
    a = [t for o in runner.generate(prompt, 20, s, spec=SpecConfig()) for t in o.token_ids]
    b = [t for o in runner.generate(prompt, 20, s, spec=SpecConfig()) for t in o.token_ids]
    assert a == b and len(a) == 20


def test_logit_processing_masks_what_top_k_top_p_and_min_p_exclude():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(process_logits(logits, Sampling(temperature=1.0, top_k=2), [])[2:]).all()
    kept = ~torch.isinf(process_logits(logits, Sampling(temperature=1.0, top_p=0.7), []))
    assert kept.tolist() == [True, True, False, False]
    kept = ~torch.isinf(process_logits(logits, Sampling(temperature=1.0, min_p=0.25), []))
    assert kept.tolist() == [True, True, True, False]
