"""Scoring math: gathered candidate log-probs equal a full log-softmax, chunked or not."""

from __future__ import annotations

import pytest
import torch

from llm_engine.scoring import (
    ScoringError,
    ScoringOptions,
    gather_logprobs,
    plan,
    plan_loglik,
    plan_yes_prob,
    ranking_of,
    reduce_scores,
    score_items,
)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _full_forward_hidden(model):
    def hidden_for(items):
        rows = []
        with torch.no_grad():
            for it in items:
                h = model.model(torch.tensor([it.token_ids])).last_hidden_state[0]
                rows.append(h[it.target_positions])
        return torch.cat(rows)
    return hidden_for


def test_gather_equals_full_log_softmax_at_any_chunk_size():
    torch.manual_seed(1)
    hidden, weight = torch.randn(37, 16), torch.randn(101, 16)
    targets = torch.randint(0, 101, (37, 2))
    want = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets)
    for budget in (1, 101, 5 * 101 + 3, 1 << 24):
        got = gather_logprobs(hidden, weight, targets, max_chunk_elements=budget)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_gather_adds_the_output_bias():
    hidden, weight, bias = torch.randn(4, 8), torch.randn(11, 8), torch.randn(11)
    targets = torch.randint(0, 11, (4, 1))
    want = torch.log_softmax(hidden @ weight.t() + bias, -1).gather(1, targets)
    torch.testing.assert_close(gather_logprobs(hidden, weight, targets, bias=bias), want)


def test_loglik_plan_scores_each_candidate_token_from_the_position_before_it():
    (item,) = plan_loglik([5, 6, 7], [[8, 9]])
    assert item.token_ids == [5, 6, 7, 8, 9]
    assert item.prefix_len == 3
    assert item.target_positions == [2, 3]
    assert item.target_ids == [[8], [9]]


def test_loglik_scores_match_a_full_forward_per_candidate(tiny_llama):
    ctx, cands = [1, 2, 3, 4, 5], [[10], [11, 12, 13], [14, 15]]
    items = plan_loglik(ctx, cands)
    opts = ScoringOptions(normalize="sum")
    res = score_items(items, _full_forward_hidden(tiny_llama), tiny_llama.lm_head.weight.detach(), opts,
                      max_chunk_elements=97 * 2)
    with torch.no_grad():
        for i, cand in enumerate(cands):
            logp = torch.log_softmax(tiny_llama(torch.tensor([ctx + cand])).logits[0], -1)
            want = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cand))
            assert res.scores[i] == pytest.approx(want, abs=1e-4)
    assert res.ranking == sorted(range(3), key=lambda i: -res.scores[i])
    assert res.prompt_tokens == sum(len(ctx) + len(c) for c in cands)


def test_length_normalisations():
    lp = torch.tensor([[-1.0], [-3.0], [-2.0]])
    seg = torch.tensor([0, 0, 1])
    assert reduce_scores(lp, seg, 2, ScoringOptions(normalize="sum")).tolist() == [-4.0, -2.0]
    assert reduce_scores(lp, seg, 2, ScoringOptions(normalize="mean")).tolist() == [-2.0, -2.0]
    power = reduce_scores(lp, seg, 2, ScoringOptions(normalize="power", length_alpha=0.5)).tolist()
    assert power == pytest.approx([-4.0 / 2 ** 0.5, -2.0])


def test_yes_prob_reads_yes_and_no_at_the_last_template_token(tiny_llama):
    items = plan_yes_prob([1, 2], [[3], [4, 5]], [6, 7], yes_id=8, no_id=9)
    assert [it.target_positions for it in items] == [[4], [5]]
    res = score_items(items, _full_forward_hidden(tiny_llama), tiny_llama.lm_head.weight.detach(),
                      ScoringOptions(method="yes_prob"))
    with torch.no_grad():
        for i, it in enumerate(items):
            p = torch.softmax(tiny_llama(torch.tensor([it.token_ids])).logits[0, -1], -1)
            assert res.scores[i] == pytest.approx((p[8] / (p[8] + p[9])).item(), abs=1e-5)


def test_yes_prob_without_no_token_is_the_raw_probability():
    lp = torch.log(torch.tensor([[0.25], [0.5]]))
    got = reduce_scores(lp, torch.tensor([0, 1]), 2, ScoringOptions(method="yes_prob", no_token=None))
    assert got.tolist() == pytest.approx([0.25, 0.5])


def test_plan_tokenises_context_and_candidates_separately_so_the_prefix_is_shared():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731 - a character tokenizer
    items = plan(ScoringOptions(), "ab", ["c", "de"], encode, bos_id=0)
    assert [it.token_ids for it in items] == [[0, 97, 98, 99], [0, 97, 98, 100, 101]]
    assert all(it.prefix_len == 3 for it in items)
    yes = plan(ScoringOptions(method="yes_prob", template="Q {context} I {candidate}?", yes_token="y",
                              no_token="n"), "ab", ["c"], encode)
    assert yes[0].token_ids == encode("Q ab I c?")
    assert yes[0].target_ids == [[ord("y"), ord("n")]]


def test_bad_requests_are_clear_errors():
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    with pytest.raises(ScoringError, match="method"):
        plan(ScoringOptions(method="vibes"), "a", ["b"], encode)
    with pytest.raises(ScoringError, match="candidate 1"):
        plan(ScoringOptions(), "a", ["b", ""], encode)
    with pytest.raises(ScoringError, match="exactly one token"):
        plan(ScoringOptions(method="yes_prob", yes_token="yes"), "a", ["b"], encode)
    with pytest.raises(ScoringError, match="template"):
        plan(ScoringOptions(method="yes_prob", template="{candidate} {context}"), "a", ["b"], encode)


def test_ranking_is_best_first_and_stable_on_ties():
    assert ranking_of(torch.tensor([0.1, 0.5, 0.1, 0.9])) == [3, 1, 0, 2]
