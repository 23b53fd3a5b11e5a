"""The cold-start hold: a fresh learner's first stretch of an early stream is joined as the
windowed join would, then the stream is trained early with FNW (training.delayed_feedback)."""

import numpy as np
import pytest
import torch

from training_helpers import early_rows, positive_copies

from streams.events import ExampleBatch
from streams.example_batch import EMIT_EARLY, EMIT_WINDOW
from streams.join_build import positive_copy_ids

WAIT_S = 2.0  # a label is final 2 s after its impression


def _learner(warm=100, **kw):
    from training.config import TrainerConfig
    from training.learner import Learner

    cfg = TrainerConfig(publish=False, batch_size=64, early_label_wait_s=WAIT_S,
                        early_warmup_examples=warm, **kw)
    return Learner.for_batch(cfg, early_rows([1], [1], [0.0]))


@pytest.fixture
def spy(monkeypatch):
    import training.learner as module

    def attach(learner):
        rows, weights = [], []
        step, early_weights = learner._step, module.early_weights

        def spy_step(batch, now, t1):
            rows.append(batch)
            return step(batch, now, t1)

        def spy_weights(logits, labels, emit, correction):
            w = early_weights(logits, labels, emit, correction)
            weights.append(torch.ones_like(labels) if w is None else w.detach().clone())
            return w
        monkeypatch.setattr(learner, "_step", spy_step)
        monkeypatch.setattr(module, "early_weights", spy_weights)
        return rows, weights
    return attach


def _all(rows):
    return ExampleBatch.concat(rows)


def test_a_negative_whose_copy_comes_in_the_warmup_is_trained_once_as_a_positive_never_as_a_negative(spy):
    learner = _learner()
    rows, weights = spy(learner)
    first = early_rows([10, 11, 12], [5, 6, 7], [0, 0, 0], t=1_000)
    assert learner.train(first) == 0  # held: no label is final yet
    assert learner.train(positive_copies(first, [0], t=1_000)) == 0  # merged into its negative
    assert learner.train(early_rows([20, 21], [8, 9], [0, 0], t=3_500)) == 3  # 1_000 is final
    got = _all(rows)
    assert got.example_id.tolist() == [10, 11, 12]
    assert got.label.tolist() == [1.0, 0.0, 0.0]
    assert (got.emit == EMIT_WINDOW).all()  # a windowed example: no FNW
    torch.testing.assert_close(torch.cat(weights), torch.ones(3))
    assert positive_copy_ids(np.array([10]))[0] not in got.example_id


def test_a_held_positive_counts_one_click_and_one_impression(spy):
    learner = _learner(counters=True, count_decay=1.0)
    spy(learner)
    first = early_rows([10, 11], [5, 6], [0, 0], t=1_000)
    learner.train(first)
    learner.train(positive_copies(first, [0], t=1_000))
    learner.train(early_rows([20], [8], [0], t=3_500))
    counts = learner.table.lookup("item_id", torch.tensor([5, 6]))[:, -2:]
    torch.testing.assert_close(counts, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))  # clicks, shown


def _warm_with_one_held(spy):
    """A learner warm after 2 final labels (one click), holding negative 20 (final at 5_500)."""
    learner = _learner(warm=2)
    rows, weights = spy(learner)
    first = early_rows([10, 11], [5, 6], [0, 0], t=1_000)
    learner.train(first)
    learner.train(positive_copies(first, [1], t=1_000))  # (the head starts at p = 1/2)
    held = early_rows([20], [4], [0], t=3_500)
    assert learner.train(held) == 2  # 10 and 11 are final: two final labels, warm
    assert learner.cold_hold.warm
    return learner, rows, weights, held


def test_once_warm_early_rows_are_trained_at_once_with_fnw(spy):
    learner, rows, weights, _ = _warm_with_one_held(spy)
    late = early_rows([30, 31], [7, 8], [0, 0], t=4_000)
    assert learner.train(late) == 2
    assert rows[-1].example_id.tolist() == [30, 31] and (rows[-1].emit == EMIT_EARLY).all()
    assert (weights[-1] < 1.0).all()  # FNW's (1 - p)(1 + p) on a negative
    assert learner.train(positive_copies(late, [0], t=4_000)) == 1  # its copy: at once, FNW
    assert rows[-1].label.tolist() == [1.0] and weights[-1].item() > 1.0  # (1 + p)


def test_once_warm_a_held_negative_leaves_at_its_copy_as_a_windowed_positive(spy):
    learner, rows, weights, held = _warm_with_one_held(spy)
    assert learner.train(positive_copies(held, [0], t=3_500)) == 1
    assert rows[-1].example_id.tolist() == [20] and rows[-1].label.tolist() == [1.0]
    assert (rows[-1].emit == EMIT_WINDOW).all() and weights[-1].item() == 1.0
    assert learner.cold_hold is None  # warm, nothing held: done
    assert learner.train(early_rows([40], [9], [0], t=6_000)) == 1  # 20 is not trained again


def test_once_warm_a_held_negative_without_a_click_leaves_at_its_wait(spy):
    learner, rows, _, _ = _warm_with_one_held(spy)
    assert learner.train(early_rows([40], [9], [0], t=5_500)) == 2
    assert rows[-1].example_id.tolist() == [20, 40]
    assert rows[-1].label.tolist() == [0.0, 0.0]
    assert rows[-1].emit.tolist() == [EMIT_WINDOW, EMIT_EARLY]
    assert learner.cold_hold is None


def test_a_learner_restored_in_the_warmup_keeps_its_held_rows_and_one_restored_after_it_holds_nothing():
    from training.learner import Learner

    learner = _learner(warm=3)
    first = early_rows([10, 11], [5, 6], [0, 0], t=1_000)
    learner.train(first)
    learner.train(positive_copies(first, [1], t=1_000))
    back = Learner.restore(learner.cfg, learner.table, *learner.state())
    assert back.cold_hold is not None and not back._bias_set  # nothing trained yet
    assert back.train(early_rows([20], [8], [0], t=3_500)) == 2
    assert back.last_trained.example_id.tolist() == [10, 11]
    assert back.last_trained.label.tolist() == [0.0, 1.0]
    again = Learner.restore(back.cfg, back.table, *back.state())
    assert again.cold_hold is not None and again.cold_hold.final_trained == 2  # 20 still held
    assert again.train(positive_copies(early_rows([20], [8], [0], t=3_500), [0], t=3_500)) == 0
    assert again.train(early_rows([30], [9], [0], t=6_000)) == 1  # 20, a positive: warm
    assert again.last_trained.example_id.tolist() == [20] and again.last_trained.label.tolist() == [1.0]
    assert Learner.restore(again.cfg, again.table, *again.state()).cold_hold is not None  # 30 held
    assert again.train(early_rows([40], [9], [0], t=8_500)) == 2  # 30 final, 40 at once
    assert again.cold_hold is None
    assert Learner.restore(again.cfg, again.table, *again.state()).cold_hold is None


def test_a_windowed_stream_passes_the_hold_untouched_and_warms_it(spy):
    from training_helpers import make_batch

    learner = _learner(warm=10)
    rows, _ = spy(learner)
    batch = make_batch(32)
    assert learner.train(batch) == 32
    assert rows[0].example_id.tolist() == batch.example_id.tolist()
    assert learner.cold_hold is None


def test_flush_trains_what_is_still_held_on_the_labels_known(spy):
    learner = _learner()
    rows, _ = spy(learner)
    first = early_rows([10, 11], [5, 6], [0, 0], t=1_000)
    learner.train(first)
    learner.train(positive_copies(first, [0], t=1_000))
    assert learner.flush() == 2
    assert _all(rows).label.tolist() == [1.0, 0.0] and learner.cold_hold is None


def test_a_publish_carries_the_event_time_of_the_newest_row_trained_not_received():
    # The trainer publishes with trained_watermark_ms: rows the hold keeps back are not in the
    # parameters yet, so serving's end-to-end freshness must not count them.
    learner = _learner()
    assert learner.train(early_rows([10, 11], [5, 6], [0, 0], t=1_000)) == 0
    assert learner.watermark_ms == 1_000 and learner.trained_watermark_ms == -1
    assert learner.cold_starting
    assert learner.train(early_rows([20], [8], [0], t=3_500)) == 2  # 1_000 is final now
    assert learner.watermark_ms == 3_500 and learner.trained_watermark_ms == 1_000
