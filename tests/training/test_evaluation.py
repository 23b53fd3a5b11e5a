"""Prequential metrics: binned AUC against the exact rank statistic, windows, ground truth."""

import numpy as np

from headwater.metrics import sample_value
from training.evaluation import BinnedAUC, PrequentialEvaluator, auc_exact, grouped_auc


def _stream(n, seed=0):
    rng = np.random.default_rng(seed)
    truth_logit = rng.normal(-1.5, 1.0, n)
    p = 1 / (1 + np.exp(-truth_logit))
    labels = (rng.random(n) < p).astype(np.float32)
    return truth_logit, p.astype(np.float32), labels


def test_exact_auc_handles_ties_and_perfect_order():
    assert auc_exact(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert auc_exact(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert np.isnan(auc_exact(np.array([0.5, 0.6]), np.array([1, 1])))


def test_binned_auc_agrees_with_exact_auc():
    logit, _, labels = _stream(20000)
    scores = logit + np.random.default_rng(1).normal(0, 1, len(logit))
    acc = BinnedAUC()
    for part in np.array_split(np.arange(len(scores)), 7):
        acc.update(scores[part], labels[part])
    assert abs(acc.auc() - auc_exact(scores, labels)) < 1e-3


def test_binned_log_loss_is_the_weighted_mean_bce():
    logits = np.array([0.0, 2.0, -1.0])
    labels = np.array([1.0, 0.0, 0.0])
    w = np.array([1.0, 4.0, 4.0])
    acc = BinnedAUC()
    acc.update(logits, labels, w)
    p = 1 / (1 + np.exp(-logits))
    expect = -(w * (labels * np.log(p) + (1 - labels) * np.log(1 - p))).sum() / w.sum()
    assert abs(acc.logloss() - expect) < 1e-9


def test_windows_hold_exactly_window_examples_even_when_batches_straddle_them():
    logit, p, labels = _stream(2500)
    ev = PrequentialEvaluator(window_examples=1000)
    for part in np.array_split(np.arange(2500), 3):
        ev.update(logit[part], labels[part], truth_p=p[part])
    assert [w.examples for w in ev.windows] == [1000, 1000]
    assert ev.overall.learner.n == 2500
    assert ev.summary()["last_window"]["index"] == 1


def test_a_learner_scoring_with_the_truth_matches_the_ground_truth_auc():
    logit, p, labels = _stream(5000, seed=3)
    ev = PrequentialEvaluator(window_examples=10_000)
    ev.update(logit, labels, truth_p=p)
    s = ev.summary()["overall"]
    assert abs(s["auc"] - s["truth_auc"]) < 1e-3
    assert s["auc"] > 0.6
    assert abs(sample_value("hw_train_auc", {"model": "truth", "scope": "overall"}) - s["truth_auc"]) < 1e-9


def test_unknown_truth_leaves_ground_truth_auc_empty():
    logit, _, labels = _stream(500)
    ev = PrequentialEvaluator(window_examples=100)
    ev.update(logit, labels, truth_p=np.full(500, np.nan, np.float32))
    assert ev.summary()["overall"]["truth_auc"] is None


def test_overall_figures_survive_a_state_round_trip():
    logit, p, labels = _stream(3000)
    ev = PrequentialEvaluator(window_examples=1000)
    ev.update(logit, labels, truth_p=p)
    ev2 = PrequentialEvaluator(window_examples=1000)
    ev2.load_state(ev.state())
    assert ev2.summary()["overall"] == ev.summary()["overall"]


def test_evaluator_state_keeps_the_weighted_click_rate_and_reads_older_checkpoints():
    from training.evaluation import BinnedAUC

    acc = BinnedAUC()
    acc.update(np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 0.0, 0.0, 1.0]),
               weights=np.array([1.0, 4.0, 4.0, 1.0]))
    assert acc.label_sum == 2.0 and acc.weight_sum == 10.0
    again = BinnedAUC()
    again.load_state(acc.state())
    assert again.label_sum == 2.0
    older = {**acc.state(), "scalars": acc.state()["scalars"][:3]}  # before label_sum was kept
    again.load_state(older)
    assert again.label_sum == 5.0  # the unweighted share of positives (2 of 4) of the weight


def test_grouped_auc_is_the_row_weighted_mean_of_each_groups_exact_auc():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 200, 4000)
    scores = np.round(rng.normal(size=4000), 1)  # many ties, inside groups too
    labels = (rng.random(4000) < 0.3 + 0.2 * (scores > 0)).astype(np.float32)
    gauc, counted = grouped_auc(scores, labels, groups)
    per = [(auc_exact(scores[groups == g], labels[groups == g]), (groups == g).sum()) for g in np.unique(groups)]
    per = [(a, n) for a, n in per if not np.isnan(a)]
    assert counted == len(per) and abs(gauc - np.average([a for a, _ in per], weights=[n for _, n in per])) < 1e-12
    # Telling groups apart earns nothing: a per-group offset leaves GAUC as it is, not AUC.
    shifted = scores + 10.0 * groups
    assert abs(grouped_auc(shifted, labels, groups)[0] - gauc) < 1e-12
    assert abs(auc_exact(shifted, labels) - auc_exact(scores, labels)) > 0.01
    assert np.isnan(grouped_auc(scores, np.ones(4000), groups)[0])  # no group with both classes
