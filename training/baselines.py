"""Online baselines the learner must beat, fed the same example stream in the same order.

Both learn prequentially, like :class:`~training.learner.Learner`: :meth:`update` returns the
click probability of every row of a batch as predicted *before* the baseline learned that row,
then learns it. They exist so that ``headwater bench learning`` can say whether the learner is
worth its complexity on a given log (issue 17): on real logs, per-id click-rate counting and a
first-pass logistic regression are strong, and a recommender that loses to them is not useful.

* :class:`CountingBaseline` - smoothed per-user and per-item click rates, combined as log-odds;
  per example (a row sees the rows before it, within its batch too), vectorised per batch.
* :class:`VowpalWabbitBaseline` - Vowpal Wabbit's online logistic regression over every sparse
  slot and the dense features, one example at a time (VW's progressive validation), which gives
  it a small edge over batch-level scoring within a mini-batch.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

from embedding_store.id_index import IdIndex
from streams.events import ExampleBatch, Ragged
from training.counting import example_increments, prior_counts

log = logging.getLogger(__name__)

__all__ = ["OnlineBaseline", "CountingBaseline", "VowpalWabbitBaseline", "IdCounts"]


class OnlineBaseline(Protocol):
    """What the prequential loop needs of a baseline: a name and a test-then-train step."""

    name: str

    def update(self, batch: ExampleBatch) -> np.ndarray:
        """float64[len(batch)] probabilities predicted before learning the batch; then learns it."""
        ...


def _weights(batch: ExampleBatch) -> np.ndarray:
    """1/sample_rate per row: what a row stands for on the un-downsampled stream (as the learner)."""
    return 1.0 / np.clip(np.asarray(batch.sample_rate, np.float64), 1e-6, None)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


class IdCounts:
    """Weighted positives and totals per 64-bit id, growing without bound, dict-free.

    Ids map to rows of two growing float64 arrays through an :class:`IdIndex` (vectorised
    open addressing): a batch costs one ``np.unique`` and a few NumPy probes, no Python per id.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._index = IdIndex(capacity)
        self._pos = np.zeros(capacity, np.float64)
        self._tot = np.zeros(capacity, np.float64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positives, total) weights of each id; zeros for ids never added."""
        rows = self._index.find(np.asarray(ids, np.int64))
        known = rows >= 0
        pos = np.where(known, self._pos[np.maximum(rows, 0)], 0.0)
        tot = np.where(known, self._tot[np.maximum(rows, 0)], 0.0)
        return pos, tot

    def add(self, ids: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> None:
        """Adds each row's weight to its id's total, and weight * label to its positives."""
        uniq, inv = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        pos = np.bincount(inv, weights * labels, len(uniq))
        tot = np.bincount(inv, weights, len(uniq))
        rows = self._index.find(uniq)
        new = rows < 0
        if new.any():
            fresh = np.arange(self._size, self._size + int(new.sum()), dtype=np.int64)
            self._grow(self._size + len(fresh))
            self._index.insert(uniq[new], fresh)
            rows[new] = fresh
            self._size += len(fresh)
        self._pos[rows] += pos
        self._tot[rows] += tot

    def _grow(self, need: int) -> None:
        if need <= len(self._pos):
            return
        cap = max(need, 2 * len(self._pos))
        self._pos = np.concatenate([self._pos, np.zeros(cap - len(self._pos))])
        self._tot = np.concatenate([self._tot, np.zeros(cap - len(self._tot))])


class CountingBaseline:
    """Smoothed per-user and per-item click rates, combined as log-odds; prequential per batch.

    With the running global rate ``p0 = (P + 1) / (N + 2)`` (P, N: weighted positives and rows
    seen so far), each id's rate is smoothed toward it by a Beta prior worth ``prior`` rows:

        p_u = (P_u + prior * p0) / (N_u + prior)          (the same for p_i, per item)
        score = logit(p_u) + logit(p_i) - logit(p0)

    i.e. a naive-Bayes combination: the user's and the item's evidence add in log-odds space
    on top of the global rate (an unseen id contributes exactly ``logit(p0)``, nothing more).
    The returned probability is ``sigmoid(score)``. No fitted weights, so there is nothing to tune
    per log beyond ``prior``, and an unseen user or item falls back to the other's rate.

    Counting is a per-example learner: ``P_u``/``N_u`` of a row include the rows of the same
    batch with a strictly earlier event time (:func:`training.counting.prior_counts`; rows of
    one request, sharing a time, never see each other's labels), so the batch size does not
    matter and a user's burst of feedback counts as it happens. ``p0`` is the rate before the
    batch.
    """

    name = "counting"

    def __init__(self, prior: float = 10.0) -> None:
        if prior <= 0:
            raise ValueError("prior must be positive")
        self.prior = prior
        self.users = IdCounts()
        self.items = IdCounts()
        self.positives = 0.0
        self.total = 0.0

    def predict_logits(self, user_id: np.ndarray, item_id: np.ndarray,
                       in_batch: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The score (log-odds) of each (user, item) pair from the counts so far, plus
        ``in_batch``: float[n, 2] (positives, total) per row for its user, then for its item."""
        p0 = (self.positives + 1.0) / (self.total + 2.0)
        up, un = self.users.get(user_id)
        ip, inn = self.items.get(item_id)
        if in_batch is not None:
            (bu, bi) = in_batch
            up, un, ip, inn = up + bu[:, 0], un + bu[:, 1], ip + bi[:, 0], inn + bi[:, 1]
        pu = (up + self.prior * p0) / (un + self.prior)
        pi = (ip + self.prior * p0) / (inn + self.prior)
        return _logit(pu) + _logit(pi) - _logit(p0)

    def update(self, batch: ExampleBatch) -> np.ndarray:
        labels = np.asarray(batch.label, np.float64)
        w = _weights(batch)
        inc = example_increments(labels, batch.sample_rate)
        ones = np.ones(len(batch), np.int32)
        t = np.asarray(batch.event_time_ms, np.int64)
        in_batch = (prior_counts(np.asarray(batch.user_id, np.int64), ones, t, inc).astype(np.float64),
                    prior_counts(np.asarray(batch.item_id, np.int64), ones, t, inc).astype(np.float64))
        logits = self.predict_logits(batch.user_id, batch.item_id, in_batch)
        self.users.add(batch.user_id, labels, w)
        self.items.add(batch.item_id, labels, w)
        self.positives += float((w * labels).sum())
        self.total += float(w.sum())
        return 1.0 / (1.0 + np.exp(-logits))


class VowpalWabbitBaseline:
    """Vowpal Wabbit logistic regression, progressive validation, one example at a time.

    Every sparse slot of the batch is its own namespace (``user_id``, ``item_id`` and the rest),
    its features the ids as strings ``slot=id`` (VW hashes them into ``2**bits`` weights); the
    dense columns are numeric features ``d<k>`` of namespace ``dense``. Each row is weighted by
    ``1/sample_rate``. ``Workspace.learn`` computes an example's prediction before it updates
    on it, so the prediction read back after ``learn`` is the prequential one (checked equal to
    a separate ``predict`` call, which would double the cost).
    """

    name = "vw"

    def __init__(self, bits: int = 24, extra_args: str = "") -> None:
        from vowpalwabbit import Workspace

        self.args = f"--loss_function logistic --link logistic -b {bits} --quiet {extra_args}".strip()
        self._vw = Workspace(self.args)
        log.debug("vowpal wabbit baseline: %s", self.args)
        self.examples = 0

    def update(self, batch: ExampleBatch) -> np.ndarray:
        """Rows one at a time; the rows of one request (one user at one event time) are all
        predicted before any of them is learned, as counting and the learner score them: one
        request's labels are not known while it is ranked (learned row by row, VW read the click
        in a display of one click as "this user's rows are clicks" and ranked its other rows high)."""
        vw = self._vw
        lines = self.lines(batch)
        out = np.empty(len(lines), np.float64)
        for rows in _requests(np.asarray(batch.user_id, np.int64), np.asarray(batch.event_time_ms, np.int64)):
            if len(rows) == 1:
                ex = vw.parse(lines[rows[0]])
                vw.learn(ex)
                out[rows[0]] = ex.get_simplelabel_prediction()
                vw.finish_example(ex)
                continue
            examples = [vw.parse(lines[r]) for r in rows]
            for r, ex in zip(rows, examples):
                out[r] = vw.predict(ex)
            for ex in examples:
                vw.learn(ex)
                vw.finish_example(ex)
        self.examples += len(lines)
        return out

    @staticmethod
    def lines(batch: ExampleBatch) -> list[str]:
        """The batch in VW's text format, one line per row (label weight |ns features...)."""
        n = len(batch)
        labels = np.where(np.asarray(batch.label) > 0.5, "1", "-1")
        w = _weights(batch)
        heads = (labels.tolist() if np.all(w == 1.0) else
                 [f"{y} {x:.6g}" for y, x in zip(labels.tolist(), w.tolist())])
        parts = [heads]
        sparse = dict(batch.sparse)
        sparse.setdefault("user_id", Ragged(np.asarray(batch.user_id, np.int64), np.ones(n, np.int32)))
        sparse.setdefault("item_id", Ragged(np.asarray(batch.item_id, np.int64), np.ones(n, np.int32)))
        for slot in sorted(sparse):
            parts.append(_namespace(slot, sparse[slot], n))
        if batch.dense.ndim == 2 and batch.dense.shape[1]:
            parts.append(_dense_namespace(batch.dense))
        return [" |".join(row) for row in zip(*parts)]


def _requests(user: np.ndarray, t: np.ndarray) -> list[list[int]]:
    """The batch's rows grouped by request (user and event time), in order of each request's
    first row; a request's rows in batch order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for r, key in enumerate(zip(user.tolist(), t.tolist())):
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _namespace(slot: str, bag: Ragged, n: int) -> list[str]:
    """``"slot slot=id slot=id..."`` per row (the namespace name, then its features)."""
    name = _vw_name(slot)
    feats = [f"{name}={v}" for v in bag.values.tolist()]
    lengths = bag.lengths
    if len(feats) == n and np.all(lengths == 1):
        return [f"{name} {f}" for f in feats]
    off = bag.offsets.tolist()
    return [f"{name} " + " ".join(feats[off[i]:off[i + 1]]) for i in range(n)]


def _dense_namespace(dense: np.ndarray) -> list[str]:
    """``"dense d0:x d1:y ..."`` per row, zeros left out (VW ignores them anyway)."""
    out = []
    for row in np.asarray(dense, np.float64).tolist():
        out.append("dense " + " ".join(f"d{k}:{x:.6g}" for k, x in enumerate(row)
                                       if x != 0.0 and math.isfinite(x)))
    return out


def _vw_name(slot: str) -> str:
    """A slot name safe in VW's text format (no spaces, '|' or ':')."""
    return slot.replace(" ", "_").replace("|", "_").replace(":", "_")
