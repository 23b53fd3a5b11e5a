"""Fake-negative weighting (Ktena et al. 2019) as the learner's loss on early-emitted rows."""

import math

import numpy as np
import pytest
import torch

from training_helpers import early_rows as _early, positive_copies as _copy_of

from streams.example_batch import EMIT_EARLY
from training.delayed_feedback import early_weights, fnw_weights
from training.model.loss import weighted_bce


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_fnw_loss_matches_its_formula_on_a_hand_made_batch():
    z = [0.3, -1.2, 2.0, -0.4]
    y = [1.0, 0.0, 0.0, 1.0]
    logits, labels = torch.tensor(z), torch.tensor(y)
    loss = weighted_bce(logits, labels, torch.ones(4), fnw_weights(logits, labels))
    want = 0.0
    for zi, yi in zip(z, y):
        q = _sig(zi)
        want += -(1 + q) * math.log(q) if yi else -(1 - q) * (1 + q) * math.log(1 - q)
    assert loss.item() == pytest.approx(want / 4, rel=1e-5)


def test_no_gradient_flows_through_the_weights():
    z = torch.tensor([0.3, -1.2, 2.0, -0.4], requires_grad=True)
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    weighted_bce(z, labels, None, fnw_weights(z, labels)).sum().backward()
    q = torch.sigmoid(z.detach())
    # p held constant: d/dz of -(1+p) log q is -(1+p)(1-q); of -(1-p)(1+p) log(1-q) is (1-p)(1+p) q
    want = torch.where(labels > 0, -(1 + q) * (1 - q), (1 - q) * (1 + q) * q) / 4
    torch.testing.assert_close(z.grad, want)


def test_only_early_rows_are_weighted_and_none_turns_it_off():
    logits, labels = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0])
    emit = np.array([0, EMIT_EARLY], np.uint8)
    w = early_weights(logits, labels, emit, "fnw")
    torch.testing.assert_close(w, torch.tensor([1.0, 0.75]))  # (1 - 0.5)(1 + 0.5)
    assert early_weights(logits, labels, emit, "none") is None
    assert early_weights(logits, labels, np.zeros(2, np.uint8), "fnw") is None


def test_dedup_keeps_an_early_negative_and_its_positive_copy_but_drops_a_replayed_copy():
    from streams.join_build import positive_copy_ids
    from training.dedup import SeenFilter

    neg = np.array([11, 12, 13], np.int64)
    seen = SeenFilter(1 << 10)
    assert seen.filter_new(neg).all()
    assert seen.filter_new(positive_copy_ids(neg[:1])).all()
    assert not seen.filter_new(positive_copy_ids(neg[:1])).any()


def _learner(**kw):
    from training.config import TrainerConfig
    from training.learner import Learner

    # the warm path: a fresh learner's cold-start hold would keep these negatives back
    cfg = TrainerConfig(publish=False, batch_size=64, **{"counters": True, "early_warmup_examples": 0, **kw})
    return Learner.for_batch(cfg, _early([1], [1], [0.0]))


def _counters_seen(learner):
    """Records the counter columns each trained batch was scored with."""
    seen = []
    logits = learner.logits

    def spy(emb, dense, tower=None):
        seen.append(emb[:, :, -2:].detach().clone())
        return logits(emb, dense, tower)
    learner.logits = spy
    return seen


def test_a_positive_copy_is_scored_with_the_counters_its_negative_had():
    learner = _learner()
    seen = _counters_seen(learner)
    first = _early([10, 11, 12], [5, 6, 7], [0, 0, 0])
    learner.train(first)
    learner.train(_early(np.arange(100, 108), [5] * 8, [0] * 8, t=2_000))  # item 5 moves on
    learner.train(_copy_of(first, [0], t=3_000))
    torch.testing.assert_close(seen[2][0], seen[0][0])
    assert learner.early_memory.hits == 1 and learner.early_memory.misses == 0


def test_without_the_memory_the_copy_reads_counters_that_moved_since_its_negative():
    learner = _learner(early_memory_rows=0)
    seen = _counters_seen(learner)
    first = _early([10, 11, 12], [5, 6, 7], [0, 0, 0])
    learner.train(first)
    learner.train(_early(np.arange(100, 108), [5] * 8, [0] * 8, t=2_000))
    learner.train(_copy_of(first, [0], t=3_000))
    assert not torch.allclose(seen[2][0], seen[0][0])


def test_a_positive_copy_adds_a_click_to_its_counters_but_no_second_impression():
    learner = _learner(count_decay=1.0)
    first = _early([10, 11], [5, 6], [0, 0])
    learner.train(first)
    learner.train(_copy_of(first, [0], t=1_000))
    counts = learner.table.lookup("item_id", torch.tensor([5, 6]))[:, -2:]
    torch.testing.assert_close(counts, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))  # clicks, shown


def test_early_increments_zero_only_the_copies_example_count():
    from training.delayed_feedback import early_increments

    inc = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    out = early_increments(inc, np.array([0.0, 1.0, 1.0]), np.array([EMIT_EARLY, EMIT_EARLY, 0], np.uint8))
    assert out.tolist() == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    assert early_increments(inc, np.ones(3), None) is inc


def test_the_counter_memory_forgets_a_negative_whose_entry_a_newer_one_took():
    from streams.join_build import positive_copy_ids
    from training.delayed_feedback import EarlyCounterMemory

    memory = EarlyCounterMemory(1024, slots=1)
    early = np.full(1, EMIT_EARLY, np.uint8)
    neg = np.array([3], np.int64)
    memory.apply(np.full((1, 1, 2), 7.0, np.float32), neg, np.zeros(1), early)
    slot = int(positive_copy_ids(neg)[0]) & 1023
    other = next(i for i in range(10_000, 10**6) if int(positive_copy_ids(np.array([i]))[0]) & 1023 == slot)
    memory.apply(np.full((1, 1, 2), 9.0, np.float32), np.array([other]), np.zeros(1), early)
    now = np.full((1, 1, 2), 1.0, np.float32)
    assert memory.apply(now, positive_copy_ids(neg), np.ones(1), early).tolist() == now.tolist()
    assert memory.apply(now, positive_copy_ids(np.array([other])), np.ones(1), early)[0, 0, 0] == 9.0
    assert (memory.hits, memory.misses) == (1, 1)


def test_an_early_stream_starts_its_bias_only_once_a_click_came_counting_impressions_once():
    learner = _learner()
    learner.train(_early(np.arange(100), np.arange(100), np.zeros(100)))
    # A windowed start would have put the head's bias at logit(1e-4) = -9.2: no click yet.
    assert not learner._bias_set and abs(learner.tower.head.bias.item()) < 1.0
    nxt = _early(np.arange(100, 200), np.arange(100), np.zeros(100))
    learner.train(ExampleBatch_concat(nxt, _copy_of(nxt, np.arange(20), t=1_000)))
    # 20 clicks in 200 impressions (each clicked row is there twice, its copy not counted again)
    assert learner._bias_set
    # (then the batch's one Adam step moves it by about the learning rate)
    assert learner.tower.head.bias.item() == pytest.approx(math.log(0.1 / 0.9), abs=2e-3)


def ExampleBatch_concat(*batches):
    from streams.events import ExampleBatch

    return ExampleBatch.concat(list(batches))
