"""Fake-negative weighting (Ktena et al. 2019) as the learner's loss on early-emitted rows."""

import math

import numpy as np
import pytest
import torch

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


def test_the_learner_trains_an_early_stream_without_taking_its_first_labels_as_the_ctr():
    from training.config import TrainerConfig
    from training.learner import Learner

    from training_helpers import make_batch

    batch = make_batch(256)
    batch.label[:] = 0.0  # an early stream starts with negatives only: clicks come later
    batch.emit = np.full(len(batch), EMIT_EARLY, np.uint8)
    learner = Learner.for_batch(TrainerConfig(publish=False, batch_size=256), batch)
    assert learner.train(batch) == 256
    # A windowed start would have put the head's bias at logit(1e-4) = -9.2.
    assert float(learner.tower.head.bias.abs().max()) < 1.0
