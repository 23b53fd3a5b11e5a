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

The correction assumes the positive copy is the *same* x as its fake negative. The joiner sends
the same ids, but what the tower reads for them is the table's state when the row is trained:
the per-id counters (``ModelConfig.counters``) and the embedding rows themselves have moved by
the time the click comes, most of all the rows of the ids the negative just pushed down (a new
user's row takes a full Adagrad step from its request's negatives). The tower then learns to tell
a copy from a negative by that movement, a signal serving never sees; the smaller the batch,
the more updates between a negative and its copy, the larger the loss. On the generator (clicks
up to 5 s after a 1 s hold, 300k events, 256-row batches) early+FNW, its copies given only
their negatives' counters, fell to 0.787 AUC against the window's 0.853 this way.
:class:`EarlyFeatureMemory` keeps the tower input each early negative was trained with (every
slot's pooled row, counters included) under its copy's id and gives it to the copy, whose
gradient still updates the rows as they are now: 0.832, the rest of the gap in the stream's
first fifth (cold start). The price is a stale input for the copy: at 1024-row batches, where
little leaked, 0.004 AUC. A copy adds a positive to its ids' counters but no second example
(:func:`early_increments`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CORRECTIONS", "EarlyFeatureMemory", "EarlyCounterMemory", "fnw_weights", "early_weights",
           "early_increments", "start_counts"]

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


def start_counts(labels: torch.Tensor, sample_rate: torch.Tensor, emit: np.ndarray | None
                 ) -> tuple[float, float, bool]:
    """(positives, impressions, early) of a batch, for the click rate a fresh model's bias starts
    at (weighted by 1/sample_rate).

    An early-emitted positive is there twice (its negative and its copy), so impressions are
    counted once: windowed rows plus early negatives. A fresh learner on an early stream sums
    these over its first batches until one holds a positive (its first rows are negatives whose
    clicks are still to come), then starts its bias there: without a start the bias sat at
    p = 1/2, and the dense tower's small Adam steps took thousands of batches to move it.
    The start is low on a stream's very first batches (clicks after the hold not yet in);
    FNW's weights then pull it up.
    """
    w = 1.0 / sample_rate.clamp(min=1e-6)
    positives = float((w * labels).sum())
    if emit is None or not np.any(emit):
        return positives, float(w.sum()), False
    early = torch.from_numpy(np.asarray(emit) != 0)
    return positives, float(w[~early | (labels <= 0.5)].sum()), True


def early_increments(increments: np.ndarray, label: np.ndarray, emit: np.ndarray | None) -> np.ndarray:
    """``increments`` (float[B, 2], positives and examples per row, from
    :func:`training.counting.example_increments`) with an early positive copy's example count
    set to 0: its impression was counted once already, by its negative."""
    if emit is None or not np.any(emit):
        return increments
    copy = (np.asarray(emit) != 0) & (np.asarray(label) > 0.5)
    out = increments.copy()
    out[copy, 1] = 0.0
    return out


class EarlyFeatureMemory:
    """The tower input each early negative was trained with, under its positive copy's id.

    A direct-mapped table of ``rows`` entries (rounded up to a power of two), keyed by
    :func:`~streams.join_build.positive_copy_ids` of the negative: O(1) and vectorised, bounded
    memory. Each entry holds a row's pooled slot vectors (float[slots, columns]); the last
    ``exact_columns`` (the counters) are kept in float32, the embedding columns in float16 (half
    the memory; the rounding, ~1e-3 relative, is far below what separates a moved row). A
    newer negative that maps to the same entry replaces the older one; a copy whose negative is
    gone (replaced, or trained before a restart) keeps what it reads now (counted in
    ``misses``). Size it for the impressions of one join window: the generator's 10 s window at
    4,000 impressions/s needs 40k; the default 1M (a 10 s window of 100k impressions/s) takes
    about 1M x slots x (2 x embedding columns + 4 x counter columns) bytes once filled.
    """

    def __init__(self, rows: int, slots: int, columns: int = 2, exact_columns: int | None = None) -> None:
        size = 1 << max(10, int(rows - 1).bit_length())
        exact = columns if exact_columns is None else min(int(exact_columns), columns)
        self.mask = np.uint64(size - 1)
        self.keys = np.zeros(size, np.int64)
        self.used = np.zeros(size, bool)
        self.split = columns - exact  # columns before it: float16; from it: float32
        self.rounded = np.zeros((size, slots, self.split), np.float16)
        self.exact = np.zeros((size, slots, exact), np.float32)
        self.hits = 0
        self.misses = 0

    def _index(self, keys: np.ndarray) -> np.ndarray:
        return (keys.view(np.uint64) & self.mask).astype(np.int64)

    def apply(self, features: np.ndarray, example_id: np.ndarray, label: np.ndarray,
              emit: np.ndarray | None) -> np.ndarray | None:
        """Remembers the early negatives' rows of ``features`` (float[B, slots, columns], what
        each row was scored with) and returns ``features`` with each early copy's rows replaced
        by its negative's (None when the batch has no early copy)."""
        if emit is None or not np.any(emit):
            return None
        from streams.join_build import positive_copy_ids

        early = np.asarray(emit) != 0
        positive = np.asarray(label) > 0.5
        neg = np.flatnonzero(early & ~positive)
        if len(neg):
            keys = positive_copy_ids(np.asarray(example_id)[neg])
            at = self._index(keys)
            self.keys[at], self.used[at] = keys, True
            self.rounded[at] = features[neg, :, :self.split]
            self.exact[at] = features[neg, :, self.split:]
        copies = np.flatnonzero(early & positive)
        if not len(copies):
            return None
        keys = np.asarray(example_id, np.int64)[copies]
        at = self._index(keys)
        hit = self.used[at] & (self.keys[at] == keys)
        self.hits += int(hit.sum())
        self.misses += int(len(hit) - hit.sum())
        out = features.copy()
        out[copies[hit], :, :self.split] = self.rounded[at[hit]]
        out[copies[hit], :, self.split:] = self.exact[at[hit]]
        return out


EarlyCounterMemory = EarlyFeatureMemory  # its first name, when it held the counters only
