"""Prequential evaluation: every batch is scored *before* the model trains on it.

On a stream that is the honest test error: each prediction is made on data the model has never
seen. We keep AUC and log loss per window of examples and over the whole run, for the learner and,
where the generator knows it (``ExampleBatch.truth_p``), for the ground-truth model on the same
examples — the ceiling the learner is chasing.

AUC is computed from score histograms (``np.bincount`` over fixed logit bins) rather than sorted
score lists, so the overall figure needs O(bins) memory on an endless stream; ties inside a bin
count half, which at 16k bins over [-20, 20] logits moves AUC by well under 1e-3.
Log loss weights each example by 1/sample_rate, estimating the loss on the un-downsampled stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from prometheus_client import Counter, Gauge

__all__ = ["BinnedAUC", "WindowResult", "PrequentialEvaluator", "auc_exact", "grouped_auc"]

AUC_GAUGE = Gauge("hw_train_auc", "prequential AUC (scored before training)", ["model", "scope"])
LOGLOSS_GAUGE = Gauge("hw_train_logloss", "prequential log loss, weighted by 1/sample_rate",
                      ["model", "scope"])
EVAL_EXAMPLES = Counter("hw_train_evaluated_examples", "examples scored before training")

_EPS = 1e-7


def auc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties (the reference the binned version is tested against)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels) > 0.5
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Average rank per group of equal scores.
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def grouped_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """(GAUC, groups counted): each group's exact AUC (average ranks for ties), averaged with
    the group's rows as weights, over the groups that hold both a positive and a negative.

    With a request as the group it asks what a recommender is for: how well does the model
    order the items of one user's one impression (a global AUC also rewards telling users
    apart). NaN and 0 when no group holds both classes."""
    scores = np.asarray(scores, np.float64)
    y = (np.asarray(labels) > 0.5).astype(np.float64)
    n = len(scores)
    if n == 0:
        return float("nan"), 0
    order = np.lexsort((scores, groups))
    g, s, y = np.asarray(groups)[order], scores[order], y[order]
    group_start = np.ones(n, bool)
    group_start[1:] = g[1:] != g[:-1]
    run_start = group_start.copy()  # a run: equal scores within a group (ties share a rank)
    run_start[1:] |= s[1:] != s[:-1]
    group_of = np.cumsum(group_start) - 1
    run_of = np.cumsum(run_start) - 1
    starts = np.flatnonzero(run_start)
    run_len = np.diff(np.append(starts, n))
    first_of_group = np.flatnonzero(group_start)
    rank = (starts - first_of_group[group_of[starts]] + (run_len - 1) / 2.0 + 1.0)[run_of]
    size = np.bincount(group_of)
    pos = np.bincount(group_of, weights=y)
    neg = size - pos
    both = (pos > 0) & (neg > 0)
    if not both.any():
        return float("nan"), 0
    rank_sum = np.bincount(group_of, weights=rank * y)[both]
    auc = (rank_sum - pos[both] * (pos[both] + 1) / 2.0) / (pos[both] * neg[both])
    return float(np.average(auc, weights=size[both])), int(both.sum())


class BinnedAUC:
    """Streaming AUC + log loss accumulator over logit histograms (O(bins) memory)."""

    def __init__(self, bins: int = 1 << 14, lo: float = -20.0, hi: float = 20.0) -> None:
        self.bins, self.lo, self.hi = bins, lo, hi
        self.pos = np.zeros(bins, np.float64)
        self.neg = np.zeros(bins, np.float64)
        self.n = 0
        self.loss_sum = 0.0
        self.weight_sum = 0.0
        self.label_sum = 0.0  # weighted positives: the base rate the log loss is measured at

    def _bin(self, logits: np.ndarray) -> np.ndarray:
        x = (np.asarray(logits, np.float64) - self.lo) * (self.bins / (self.hi - self.lo))
        return np.clip(x, 0, self.bins - 1).astype(np.int64)

    def update(self, logits: np.ndarray, labels: np.ndarray,
               weights: np.ndarray | None = None) -> None:
        logits = np.asarray(logits, np.float64)
        labels = np.asarray(labels, np.float64)
        if len(logits) == 0:
            return
        b = self._bin(logits)
        is_pos = labels > 0.5
        self.pos += np.bincount(b[is_pos], minlength=self.bins)
        self.neg += np.bincount(b[~is_pos], minlength=self.bins)
        w = np.ones_like(logits) if weights is None else np.asarray(weights, np.float64)
        # BCE from logits, stable: softplus(x) - y*x.
        loss = np.logaddexp(0.0, logits) - labels * logits
        self.loss_sum += float((w * loss).sum())
        self.weight_sum += float(w.sum())
        self.label_sum += float((w * labels).sum())
        self.n += len(logits)

    def auc(self) -> float:
        p, n = self.pos.sum(), self.neg.sum()
        if p == 0 or n == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg
        return float((self.pos * (neg_below + 0.5 * self.neg)).sum() / (p * n))

    def logloss(self) -> float:
        return self.loss_sum / self.weight_sum if self.weight_sum else float("nan")

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint (so the overall figures survive a restart)."""
        return {"pos": self.pos.copy(), "neg": self.neg.copy(),
                "scalars": np.array([self.n, self.loss_sum, self.weight_sum, self.label_sum], np.float64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state["pos"].shape != (self.bins,) or state["neg"].shape != (self.bins,):
            raise ValueError("evaluator state has a different bin count")
        self.pos, self.neg = state["pos"].astype(np.float64), state["neg"].astype(np.float64)
        n, self.loss_sum, self.weight_sum, *rest = (float(x) for x in state["scalars"])
        self.n = int(n)
        # a checkpoint from before label_sum: the base rate from the (unweighted) counts
        p, q = float(self.pos.sum()), float(self.neg.sum())
        self.label_sum = rest[0] if rest else (self.weight_sum * p / (p + q) if p + q else 0.0)


@dataclass
class WindowResult:
    """The prequential figures of one finished window (or of the whole run)."""

    index: int
    examples: int
    auc: float
    logloss: float
    truth_auc: float
    truth_logloss: float
    positives_rate: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


class _Pair:
    """Learner and ground-truth accumulators over the same examples."""

    def __init__(self) -> None:
        self.learner = BinnedAUC()
        self.truth = BinnedAUC()
        self.pos_w = 0.0

    def update(self, logits: np.ndarray, labels: np.ndarray, w: np.ndarray,
               truth_p: np.ndarray | None) -> None:
        self.learner.update(logits, labels, w)
        self.pos_w += float((w * labels).sum())
        if truth_p is not None:
            known = ~np.isnan(truth_p)
            if known.any():
                self.truth.update(_logit(truth_p[known]), labels[known], w[known])

    def result(self, index: int) -> WindowResult:
        lw = self.learner.weight_sum
        return WindowResult(index, self.learner.n, self.learner.auc(), self.learner.logloss(),
                            self.truth.auc(), self.truth.logloss(),
                            self.pos_w / lw if lw else float("nan"))


class PrequentialEvaluator:
    """Scores-before-training bookkeeping: per-window and overall AUC / log loss, as metrics too.

    Call :meth:`update` with the logits the model produced *before* its update on that batch.
    """

    def __init__(self, window_examples: int = 50_000, keep_windows: int = 1000) -> None:
        if window_examples <= 0:
            raise ValueError("window_examples must be positive")
        self.window_examples = window_examples
        self.keep_windows = keep_windows
        self.overall = _Pair()
        self.window = _Pair()
        self.windows: list[WindowResult] = []
        self._index = 0

    def update(self, logits: np.ndarray, labels: np.ndarray, sample_rate: np.ndarray | None = None,
               truth_p: np.ndarray | None = None) -> None:
        logits = np.asarray(logits, np.float64)
        labels = np.asarray(labels, np.float64)
        w = (np.ones_like(logits) if sample_rate is None
             else 1.0 / np.clip(np.asarray(sample_rate, np.float64), 1e-6, None))
        tp = None if truth_p is None else np.asarray(truth_p, np.float64)
        start = 0
        # A batch may straddle a window boundary: split it so windows hold exactly N examples.
        while start < len(logits):
            room = self.window_examples - self.window.learner.n
            sl = slice(start, start + room)
            self.window.update(logits[sl], labels[sl], w[sl], None if tp is None else tp[sl])
            start += room
            if self.window.learner.n >= self.window_examples:
                self._close_window()
        self.overall.update(logits, labels, w, tp)
        EVAL_EXAMPLES.inc(len(logits))
        self._export("overall", self.overall.result(-1))

    def _close_window(self) -> None:
        res = self.window.result(self._index)
        self.windows.append(res)
        del self.windows[:-self.keep_windows]
        self._export("window", res)
        self._index += 1
        self.window = _Pair()

    @staticmethod
    def _export(scope: str, res: WindowResult) -> None:
        for model, auc, ll in (("learner", res.auc, res.logloss),
                               ("truth", res.truth_auc, res.truth_logloss)):
            if not np.isnan(auc):
                AUC_GAUGE.labels(model=model, scope=scope).set(auc)
            if not np.isnan(ll):
                LOGLOSS_GAUGE.labels(model=model, scope=scope).set(ll)

    def summary(self) -> dict:
        """JSON-ready: overall figures, the last finished window and all kept windows."""
        return {"overall": self.overall.result(-1).to_dict(),
                "last_window": self.windows[-1].to_dict() if self.windows else None,
                "windows": [w.to_dict() for w in self.windows]}

    # -- checkpointing ---------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, acc in (("learner", self.overall.learner), ("truth", self.overall.truth)):
            out.update({f"eval.{name}.{k}": v for k, v in acc.state().items()})
        out["eval.meta"] = np.array([self._index, self.overall.pos_w], np.float64)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name, acc in (("learner", self.overall.learner), ("truth", self.overall.truth)):
            acc.load_state({k: state[f"eval.{name}.{k}"] for k in ("pos", "neg", "scalars")})
        self._index, self.overall.pos_w = int(state["eval.meta"][0]), float(state["eval.meta"][1])
