"""The training loss: binary cross-entropy weighted for downsampled negatives."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["weighted_bce"]


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor,
                 sample_rate: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE with each example weighted by 1/sample_rate (times ``weight``, a per-row
    correction such as :mod:`training.delayed_feedback`'s, when given).

    Negatives kept with probability r stand for 1/r negatives, so the weighted loss is an unbiased
    estimate of the loss on the full stream and the logits come out calibrated: serving needs no
    log-odds correction.
    """
    if sample_rate is None and weight is None:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)
    w = (1.0 / sample_rate.clamp(min=1e-6) if sample_rate is not None
         else torch.ones_like(labels))
    per_row = w if weight is None else w * weight
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=per_row,
                                                          reduction="sum")
    return loss / w.sum()
