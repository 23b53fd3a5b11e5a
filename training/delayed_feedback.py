"""Fake-negative weighting: the loss correction for an early-emitted (delayed-feedback) stream.

Ktena et al., "Addressing Delayed Feedback for Continuous Training with Neural Networks in CTR
prediction", RecSys 2019. With ``headwater join --emit early`` every shown item reaches the
trainer at once as a negative and each click later as a positive copy, so the stream's label
distribution is biased: b(y=1|x) = p/(1+p). Importance weights p(y|x)/b(y|x) undo it:

    y = 1:  -(1 + p) * log q          y = 0:  -(1 - p)(1 + p) * log(1 - q)

with q the model's output and p = stop_gradient(q): the weights are estimates, not something to
learn through. The model then predicts the true click probability, so serving needs nothing.

Rule: rows marked early (``ExampleBatch.emit``) get these weights when ``early_correction`` is
``fnw`` (the default); windowed rows always keep plain weighted BCE; ``none`` trains the early
stream uncorrected (the bench's comparison arm, biased low).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CORRECTIONS", "fnw_weights", "early_weights", "first_batch_ctr"]

CORRECTIONS = ("fnw", "none")


def fnw_weights(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row importance weights (1 + p) for positives, (1 - p)(1 + p) for negatives, with
    p = sigmoid(logits) detached: no gradient flows through them."""
    p = torch.sigmoid(logits.detach().float())
    return torch.where(labels > 0.5, 1.0 + p, (1.0 - p) * (1.0 + p))


def early_weights(logits: torch.Tensor, labels: torch.Tensor, emit: np.ndarray | None,
                  correction: str) -> torch.Tensor | None:
    """The loss weight of each row (FNW on early rows, 1 elsewhere), or None when no row needs
    one; pass it to :func:`training.model.loss.weighted_bce`."""
    if correction == "none" or emit is None or not np.any(emit):
        return None
    early = torch.from_numpy(np.asarray(emit) != 0)
    return torch.where(early, fnw_weights(logits, labels), torch.ones_like(labels))


def first_batch_ctr(labels: torch.Tensor, sample_rate: torch.Tensor, emit: np.ndarray | None) -> float:
    """The click rate a fresh model's bias starts at, from its first batch.

    An early-emitted positive is there twice (its negative and its copy), so the rate counts
    impressions once: windowed rows plus early negatives, against windowed positives plus early
    copies (weighted by 1/sample_rate). Without this a fresh model on an early stream started at
    p = 1/2, and the dense tower's small Adam steps took thousands of batches to move its bias.
    """
    w = 1.0 / sample_rate.clamp(min=1e-6)
    positives = float((w * labels).sum())
    if emit is None or not np.any(emit):
        return positives / max(float(w.sum()), 1e-12)
    early = torch.from_numpy(np.asarray(emit) != 0)
    impressions = float(w[~early | (labels <= 0.5)].sum())
    return positives / max(impressions, 1e-12)
