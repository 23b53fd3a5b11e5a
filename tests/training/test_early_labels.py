"""The live evaluation of an early-emitted stream scores each impression once, on its final label."""

from dataclasses import replace

import numpy as np
import pytest

from bench.delayed import generator_source
from streams.example_batch import EMIT_EARLY
from streams.generator import GeneratorConfig
from streams.join_build import positive_copy_ids
from training.config import TrainerConfig
from training.early_labels import EarlyLabels
from training.learner import Learner


def _route(el, logits, labels, ids, times, emit):
    n = len(logits)
    return el.route(np.asarray(logits, float), np.asarray(labels, float), np.ones(n), None,
                    np.asarray(ids, np.int64), np.asarray(times, np.int64), np.asarray(emit, np.int8))


def test_a_negative_waits_for_the_window_and_leaves_in_emission_order_with_its_final_label():
    el = EarlyLabels(wait_ms=10_000)
    ids = np.array([11, 12, 13], np.int64)
    # two windowed rows pass at once; three early negatives wait
    out = _route(el, [0.5, -0.5, 1.0, 2.0, 3.0], [1, 0, 0, 0, 0], [1, 2, *ids], [0, 0, 0, 0, 0],
                 [0, 0, EMIT_EARLY, EMIT_EARLY, EMIT_EARLY])
    assert out.logits.tolist() == [0.5, -0.5] and len(el) == 3
    # the click on 12 comes as its copy: nothing leaves yet (its window is still open)
    out = _route(el, [9.0], [1], positive_copy_ids(ids[1:2]), [4_000], [EMIT_EARLY])
    assert len(out) == 0 and len(el) == 3
    # a second positive kind on the same item sends the same copy id: counted once
    _route(el, [9.5], [1], positive_copy_ids(ids[1:2]), [4_500], [EMIT_EARLY])
    # event time passes 0 + 10 s: all three leave in emission order, 12 with label 1 and the
    # NEGATIVE's score (2.0; the copy's 9.0 came after the negative was learned)
    out = _route(el, [0.0], [0], [3], [10_001], [0])
    assert out.logits.tolist() == [0.0, 1.0, 2.0, 3.0] and out.labels.tolist() == [0, 0, 1, 0]
    assert len(el) == 0 and el.summary() == {"pending": 0, "pending_clicked": 0, "resolved_positive": 1,
                                             "resolved_negative": 2, "unmatched_copies": 0}
    # a copy whose negative was never seen (trained before a restart) is scored itself
    out = _route(el, [0.7], [1], [999], [11_000], [EMIT_EARLY])
    assert out.logits.tolist() == [0.7] and el.unmatched_copies == 1


def test_pending_negatives_are_bounded_oldest_first():
    el = EarlyLabels(wait_ms=10**9, max_pending=2)
    out = _route(el, [1.0, 2.0, 3.0], [0, 0, 0], [1, 2, 3], [0, 1, 2], [EMIT_EARLY] * 3)
    assert out.logits.tolist() == [1.0] and len(el) == 2
    with pytest.raises(ValueError):
        EarlyLabels(wait_ms=-1)


@pytest.mark.parametrize("warmup", [0, None])  # None: the default cold-start hold
def test_the_learners_live_figures_count_each_impression_once_on_an_early_stream(warmup):
    world = replace(GeneratorConfig(), seed=3, users=300, items=200, max_action_delay_ms=5_000)
    early = generator_source(world, 80_000, window_ms=10_000, hold_ms=1_000)("early")
    impressions = int(early.first.sum())
    clicks = int((early.true_label[early.first] > 0).sum())
    cfg = TrainerConfig(early_label_wait_s=6.0, eval_window=5_000)
    if warmup is not None:
        cfg = replace(cfg, early_warmup_examples=warmup)
    learner = Learner.for_batch(cfg, early.batch)
    b = early.batch
    for lo in range(0, len(b), 512):
        learner.train(b.take(np.arange(lo, min(len(b), lo + 512))))
    seen = learner.evaluator.overall.learner.n
    el = learner.early_labels
    hold = learner.cold_hold_stats or (learner.cold_hold.summary() if learner.cold_hold else None)
    still_held = hold["held"] - hold["released"] if hold else 0
    assert (hold is None) == (warmup == 0)
    # every impression scored once: finished ones in the evaluator, the last window's waiting
    # (and, with the hold, rows it still keeps back: they are scored when they leave it)
    assert seen + len(el) + still_held == impressions, (seen, len(el), still_held, impressions)
    got = el.summary()
    assert got["unmatched_copies"] == 0
    if warmup == 0:
        assert got["resolved_positive"] + got["pending_clicked"] == clicks
        # as scored, the positives are the clicks of the finished impressions (no fake negatives)
        assert learner.evaluator.overall.pos_w == pytest.approx(got["resolved_positive"])
        assert got["resolved_positive"] > 0.5 * clicks
    else:  # the hold's rows leave as windowed examples, scored on their final label at once
        assert hold["held"] > 0 and hold["final_trained"] >= 40_000
        assert learner.evaluator.overall.pos_w > 0.5 * clicks
