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

__all__ = ["prior_counts", "example_increments", "decayed_counts"]


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


def decayed_counts(values: np.ndarray, lengths: np.ndarray, event_time_ms: np.ndarray,
                   increments: np.ndarray, before: np.ndarray, decay: float,
                   mean: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Counters that forget: each new occurrence of an id first multiplies its counts by ``decay``.

    ``before`` float[m, k] holds each (row, id) pair's counters in the table before the batch
    (pairs in ragged order). Returns ``(pooled, delta)``: float32[B, k], per row the pooled
    counters its ids had when it was scored (decayed by the id's earlier occurrences in the
    batch, plus their decayed increments; ties in event time do not see each other), and
    float32[m, k], what to add to the table so that each id ends the batch with
    ``decay^n * before + sum_i decay^(n-1-i) * increment_i`` over its n occurrences (all on
    the id's last pair, zero elsewhere). ``decay = 1`` is plain counting.
    """
    n, k = len(lengths), increments.shape[1]
    m = len(values)
    pooled = np.zeros((n, k), np.float64)
    delta = np.zeros((m, k), np.float64)
    if m == 0:
        return pooled.astype(np.float32), delta.astype(np.float32)
    row = np.repeat(np.arange(n), lengths)
    t = np.asarray(event_time_ms)[row]
    order = np.lexsort((row, t, values))
    ids_s, t_s, row_s = values[order], t[order], row[order]
    new_id = np.ones(m, bool)
    new_id[1:] = ids_s[1:] != ids_s[:-1]
    idx = np.arange(m)
    id_start = np.maximum.accumulate(np.where(new_id, idx, 0))
    occ = (idx - id_start).astype(np.float64)  # occurrence number within the id, from 0
    g = float(decay)
    # sum_{i<k} g^(k-1-i) inc_i = g^(k-1) * sum_{i<k} g^-i inc_i; batches are short enough
    # (k <= batch rows) for g^-k to stay finite in float64 at any sensible decay.
    scaled = increments[row_s] * (g ** -occ)[:, None]
    csum = np.cumsum(scaled, axis=0)
    group_before = np.where(id_start[:, None] > 0, csum[id_start - 1], 0.0)
    excl = csum - scaled - group_before
    new_run = new_id.copy()
    new_run[1:] |= t_s[1:] != t_s[:-1]
    run_start = np.maximum.accumulate(np.where(new_run, idx, 0))
    k_run = occ[run_start]
    seen = (g ** k_run)[:, None] * before[order] + (g ** (k_run - 1))[:, None] * excl[run_start]
    for c in range(k):
        pooled[:, c] = np.bincount(row_s, weights=seen[:, c], minlength=n)
    if mean:
        pooled /= np.maximum(lengths, 1)[:, None]
    last = np.ones(m, bool)
    last[:-1] = new_id[1:]
    total = occ[last] + 1
    incl = (csum - group_before)[last]
    final = (g ** total)[:, None] * before[order][last] + (g ** (total - 1))[:, None] * incl
    delta[order[last]] = final - before[order][last]
    return pooled.astype(np.float32), delta.astype(np.float32)
