"""Per-id counts inside a mini-batch, in event-time order: what counting knows that a batch does not.

A model updated once per mini-batch scores every example of the batch with the state before it,
so a user's burst of feedback (a rating session, a shopping visit) is scored as if nothing of it
had been seen; a learner updated per example (counting, Vowpal Wabbit) uses each label for the
next example. The table's counter columns (``ModelConfig.counters``) hold every id's weighted
positives and examples *before* the batch; :func:`prior_counts` adds, for each example, what
the same id saw earlier *in* the batch (strictly earlier event time, so the items of one request
never see each other's labels). That keeps the score causal, exactly as per-example progressive
validation does, at the cost of one sort per slot.
"""

from __future__ import annotations

import numpy as np

__all__ = ["prior_counts", "example_increments"]


def example_increments(label: np.ndarray, sample_rate: np.ndarray) -> np.ndarray:
    """float64[B, 2]: what each example adds to its ids' counters (weighted positives, examples).

    An example kept with probability r stands for 1/r examples, as in the loss.
    """
    w = 1.0 / np.clip(np.asarray(sample_rate, np.float64), 1e-6, None)
    return np.stack([w * np.asarray(label, np.float64), w], axis=1)


def prior_counts(values: np.ndarray, lengths: np.ndarray, event_time_ms: np.ndarray,
                 increments: np.ndarray, mean: bool = False) -> np.ndarray:
    """float32[B, 2]: per row, the pooled in-batch counts of its bag's ids from earlier rows.

    ``values``/``lengths`` are one slot's ragged ids (rows in event-time order), ``increments``
    float[B, 2] from :func:`example_increments`. For each (row, id) pair: the sum of the
    increments of rows with the same id and a strictly earlier event time; pooled over the bag
    by sum (or mean, as the slot's embeddings are pooled).
    """
    n = len(lengths)
    out = np.zeros((n, 2), np.float64)
    if len(values) == 0:
        return out.astype(np.float32)
    row = np.repeat(np.arange(n), lengths)
    t = np.asarray(event_time_ms)[row]
    order = np.lexsort((row, t, values))  # by id, then time, then row
    ids_s, t_s, row_s = values[order], t[order], row[order]
    inc = increments[row_s]
    csum = np.cumsum(inc, axis=0)
    # Exclusive prefix sum within each id group ...
    new_id = np.ones(len(order), bool)
    new_id[1:] = ids_s[1:] != ids_s[:-1]
    id_start = np.maximum.accumulate(np.where(new_id, np.arange(len(order)), 0))
    before = csum - inc - np.where(id_start[:, None] > 0, csum[id_start - 1], 0.0)
    # ... taken at the first pair of each (id, time) run: ties do not see each other.
    new_run = new_id.copy()
    new_run[1:] |= t_s[1:] != t_s[:-1]
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(order)), 0))
    before = before[run_start]
    for c in range(2):
        out[:, c] = np.bincount(row_s, weights=before[:, c], minlength=n)
    if mean:
        out /= np.maximum(lengths, 1)[:, None]
    return out.astype(np.float32)
