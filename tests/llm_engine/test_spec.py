"""Speculative decoding parts: n-gram drafts, lossless verification, adaptive draft length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_engine.spec import (
    DraftLengthController,
    DraftTree,
    NgramDrafter,
    SpecConfig,
    StepCostModel,
    verify_greedy,
    verify_sampled,
    verify_tree_greedy,
    verify_tree_sampled,
)


def test_drafter_continues_the_latest_ngram_as_it_continued_before():
    d = NgramDrafter(min_n=2, max_n=3)
    d.extend([1, 2, 3, 4, 5, 9, 1, 2, 3])
    assert d.propose(3) == [[4, 5, 9]]


def test_drafter_prefers_the_longest_match_then_the_most_recent():
    d = NgramDrafter(min_n=1, max_n=3)
    d.extend([7, 1, 2, 50, 8, 2, 60, 7, 1, 2, 70, 1, 2])
    # "1 2" occurred after 7 (continuing 50) and after 7 again (continuing 70): most recent first.
    assert d.propose(1, branches=3) == [[70], [50], [60]]


def test_drafter_proposes_nothing_without_a_match_and_never_matches_itself():
    d = NgramDrafter(min_n=2, max_n=4)
    d.extend([1, 2, 3, 4])
    assert d.propose(4) == []
    d.extend([1, 2])
    assert d.propose(2) == [[3, 4]]


def test_draft_tree_merges_branches_sharing_a_prefix():
    tree = DraftTree.from_branches([[5, 6, 7], [5, 8], [9]], max_nodes=10)
    assert tree.tokens == [5, 6, 7, 8, 9]
    assert tree.parents == [-1, 0, 1, 0, -1]
    assert tree.depths() == [1, 2, 3, 2, 1]
    assert DraftTree.chain([1, 2]).is_chain() and not tree.is_chain()
    assert len(DraftTree.from_branches([[1, 2, 3], [4, 5]], max_nodes=4)) == 4


def test_greedy_verification_accepts_exactly_the_argmax_prefix():
    logits = torch.full((4, 10), -5.0)
    for row, tok in enumerate([3, 4, 5, 6]):
        logits[row, tok] = 5.0
    assert verify_greedy(logits, [3, 4, 9]).tokens == [3, 4, 5]
    assert verify_greedy(logits, [3, 4, 5]).tokens == [3, 4, 5, 6]
    assert verify_greedy(logits, [1, 4, 5]).tokens == [3]
    assert verify_greedy(logits[:1], []).tokens == [3]


def test_tree_greedy_follows_whichever_branch_the_target_picks():
    tree = DraftTree.from_branches([[1, 2], [3, 4]], max_nodes=8)  # nodes: 1, 2, 3, 4
    logits = torch.zeros(5, 10)
    logits[0, 3] = logits[3, 4] = logits[4, 8] = 1.0  # root -> 3 -> 4 -> bonus 8
    res = verify_tree_greedy(logits, tree)
    assert res.tokens == [3, 4, 8] and res.path == [2, 3] and res.num_accepted == 2


def _chi2_ok(counts: np.ndarray, p: np.ndarray) -> bool:
    n = counts.sum()
    expected = n * p
    mask = expected > 0
    chi2 = float((((counts - expected) ** 2)[mask] / expected[mask]).sum())
    return chi2 < 30.0  # far beyond the 0.999 quantile for these few degrees of freedom


@pytest.mark.parametrize("draft_tok", [0, 2, 4])
def test_rejection_sampling_keeps_the_target_distribution(draft_tok):
    gen = torch.Generator().manual_seed(draft_tok)
    p0 = torch.tensor([0.1, 0.2, 0.4, 0.25, 0.05])
    p1 = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    probs = torch.stack([p0, p1])
    first = np.zeros(5)
    second_after_draft = np.zeros(5)
    for _ in range(6000):
        res = verify_sampled(probs, [draft_tok], gen)
        first[res.tokens[0]] += 1
        if res.num_accepted:
            second_after_draft[res.tokens[1]] += 1
    assert _chi2_ok(first, p0.numpy())
    assert _chi2_ok(second_after_draft, p1.numpy())


def test_tree_rejection_sampling_keeps_the_target_distribution():
    gen = torch.Generator().manual_seed(7)
    tree = DraftTree.from_branches([[2], [1], [4]], max_nodes=3)
    p0 = torch.tensor([0.1, 0.2, 0.4, 0.25, 0.05])
    probs = torch.cat([p0[None], torch.full((3, 5), 0.2)])
    counts = np.zeros(5)
    for _ in range(6000):
        counts[verify_tree_sampled(probs, tree, gen).tokens[0]] += 1
    assert _chi2_ok(counts, p0.numpy())


def test_speculative_greedy_decoding_is_identical_to_plain_greedy_on_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    prompt = [1, 5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]

    @torch.no_grad()
    def logits_of(ids):
        return model(torch.tensor([ids])).logits[0]

    plain = list(prompt)
    for _ in range(24):
        plain.append(int(logits_of(plain)[-1].argmax()))
    drafter = NgramDrafter(min_n=1, max_n=3)
    drafter.extend(prompt)
    spec, accepted = list(prompt), 0
    while len(spec) < len(plain):
        draft = (drafter.propose(4) or [[]])[0]
        res = verify_greedy(logits_of(spec + draft)[len(spec) - 1 :], draft)
        accepted += res.num_accepted
        spec += res.tokens
        drafter.extend(res.tokens)
    assert spec[: len(plain)] == plain


def test_controller_drafts_for_requests_whose_drafts_are_accepted():
    ctl = DraftLengthController(SpecConfig(max_draft=6), StepCostModel(fixed=0.02, per_token=0.0002))
    for _ in range(10):
        ctl.record("good", 6, 6)
        ctl.record("bad", 6, 0)
    good, bad = ctl.draft_lengths(["good", "bad"], [6, 6])
    assert good >= 4
    assert bad == 0


def test_controller_stops_drafting_under_heavy_load():
    cost = StepCostModel(fixed=0.01, per_token=0.001)
    ctl = DraftLengthController(SpecConfig(max_draft=4), cost)
    ids = [f"r{i}" for i in range(2)]
    assert sum(ctl.draft_lengths(ids, [4] * 2)) > 0
    many = [f"r{i}" for i in range(256)]
    assert sum(ctl.draft_lengths(many, [4] * 256, other_tokens=512)) == 0


def test_controller_probes_a_non_drafting_request_now_and_then():
    ctl = DraftLengthController(SpecConfig(probe_interval=4), StepCostModel())
    for _ in range(20):
        ctl.record("r", 8, 0)
    ks = [ctl.draft_lengths(["r"], [8])[0] for _ in range(8)]
    assert ks.count(1) == 2 and set(ks) <= {0, 1}


def test_controller_is_off_when_disabled_or_without_drafts():
    assert DraftLengthController(SpecConfig(enabled=False)).draft_lengths(["a"], [5]) == [0]
    assert DraftLengthController(SpecConfig()).draft_lengths(["a"], [0]) == [0]


def test_cost_model_fits_a_linear_step_time():
    cost = StepCostModel(warmup=2)
    cost.observe(30, 5.0)  # the first steps (one-off set-up costs) are not evidence
    cost.observe(1, 3.0)
    for n in [1, 5, 9, 2, 8, 4] * 3:
        cost.observe(n, 0.03 + 0.002 * n)
    assert cost.fixed == pytest.approx(0.03, rel=1e-3)
    assert cost.per_token == pytest.approx(0.002, rel=1e-3)
