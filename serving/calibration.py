"""Correcting scores for the joiner's negative downsampling (a log-odds shift).

The joiner keeps a negative with probability ``r`` (recorded per example in ``sample_rate``;
positives have 1.0). A model fitted *unweighted* on that stream sees ``1/r`` times too few
negatives, so its odds are inflated by ``1/r``: ``odds_true = r * odds_model``, i.e.
``logit_true = logit_model + log(r)``. (A model fitted with ``1/sample_rate`` weights, like
``training.model.weighted_bce``, is already calibrated: ``r = 1`` there, and the shift is 0.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Calibrator", "calibrated", "estimate_negative_rate"]


def calibrated(logits: torch.Tensor, shift: float) -> torch.Tensor:
    """``sigmoid(logit + shift)``, computed in the logit domain (no saturation issues); plain
    ``sigmoid`` when ``shift`` is 0. TorchScript-able: compiled forwards call it too."""
    return torch.sigmoid(logits + shift) if shift != 0.0 else torch.sigmoid(logits)


@dataclass(frozen=True)
class Calibrator:
    """Maps model logits to calibrated probabilities for a negative sampling rate ``rate``."""

    rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"negative sampling rate must be in (0, 1], got {self.rate}")

    @property
    def shift(self) -> float:
        return math.log(self.rate)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``sigmoid(logit + log(rate))`` (:func:`calibrated`)."""
        return calibrated(logits, self.shift)


def estimate_negative_rate(labels: np.ndarray, sample_rate: np.ndarray) -> float:
    """The negative sampling rate of a stream from its examples' ``sample_rate`` column.

    Negatives may carry different rates (the joiner can change it over time); the right single
    rate is the one that preserves the expected count of negatives: kept / represented, i.e.
    ``n_neg / sum(1 / r_i)``. Returns 1.0 when there are no negatives.
    """
    labels = np.asarray(labels)
    rates = np.asarray(sample_rate, dtype=np.float64)[labels < 0.5]
    if rates.size == 0:
        return 1.0
    if (rates <= 0).any() or (rates > 1).any():
        raise ValueError("sample_rate values must be in (0, 1]")
    return float(rates.size / np.sum(1.0 / rates))
