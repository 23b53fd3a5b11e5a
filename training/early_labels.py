"""Prequential figures of an early-emitted stream, on each impression's final label.

With ``headwater join --emit early`` an impression reaches the trainer as a negative within a
second and its click, if one comes, later as a positive copy (:mod:`training.delayed_feedback`).
Scoring the stream as it arrives would count a clicked impression twice (a negative, then a
positive scored by a model that has just learned the negative) and an unclicked one as a
negative before its click could come: the live AUC then says little about the model, and the
publish guard judges updates by it. :class:`EarlyLabels` instead keeps each early negative's
score (taken before it was learned: the prediction serving would have made at impression time)
under its copy's id, and hands it to the evaluator once its label is final: once the stream's
event time is ``wait_ms`` past it (the join window plus its lateness, after which no copy can
come), with label 1 if its copy came meanwhile (the copy's own score is not used: it was made
after the negative was learned), else 0. Rows leave in the order they were emitted, clicked or
not: handing clicks over as they come would fill each evaluation window with newer positives
than negatives, and a model whose score level moves would then look better or worse than it is
(the publish guard judges those windows). More than ``max_pending`` waiting: the oldest leave
early (a click after that is a positive without its negative's score: scored itself).

Windowed rows (``emit`` 0) and a copy whose negative was never seen here (trained before a
restart) go to the evaluator at once with their own score. Each impression is scored once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

__all__ = ["EarlyLabels", "Scored"]


@dataclass
class Scored:
    """Rows ready for the evaluator: logits, final labels, sample rates, truth (NaN or None =
    unknown)."""

    logits: np.ndarray
    labels: np.ndarray
    sample_rate: np.ndarray
    truth_p: np.ndarray | None

    def __len__(self) -> int:
        return len(self.logits)


class EarlyLabels:
    """Holds early negatives' scores until their label is final (see the module doc)."""

    def __init__(self, wait_ms: int, max_pending: int = 1_000_000) -> None:
        if wait_ms < 0 or max_pending <= 0:
            raise ValueError("wait_ms must be >= 0 and max_pending positive")
        self.wait_ms, self.max_pending = int(wait_ms), int(max_pending)
        # copy id -> [event time ms, logit, sample rate, truth p, label]; insertion order ~ event time
        self._pending: OrderedDict[int, list] = OrderedDict()
        self.resolved_positive = 0
        self.resolved_negative = 0
        self.unmatched_copies = 0

    def __len__(self) -> int:
        return len(self._pending)

    def route(self, logits: np.ndarray, labels: np.ndarray, sample_rate: np.ndarray,
              truth_p: np.ndarray | None, example_id: np.ndarray, event_time_ms: np.ndarray,
              emit: np.ndarray | None) -> Scored:
        """One trained batch's scores in; out the rows whose label is final now."""
        if (emit is None or not np.any(emit)) and not self._pending:  # a windowed stream: as given
            return Scored(logits, labels, sample_rate, truth_p)
        n = len(logits)
        truth = np.full(n, np.nan, np.float64) if truth_p is None else np.asarray(truth_p, np.float64)
        logits = np.asarray(logits, np.float64)
        labels = np.asarray(labels, np.float64)
        rates = np.asarray(sample_rate, np.float64)
        if emit is None or not np.any(emit):
            out = Scored(logits, labels, rates, truth)
        else:
            from streams.join_build import positive_copy_ids

            early = np.asarray(emit) != 0
            positive = labels > 0.5
            now_idx = np.flatnonzero(~early)  # windowed rows: final already
            keep: list[tuple[float, float, float, float]] = []
            neg = np.flatnonzero(early & ~positive)
            for key, i in zip(positive_copy_ids(np.asarray(example_id)[neg]).tolist(), neg.tolist()):
                self._pending[key] = [int(event_time_ms[i]), logits[i], rates[i], truth[i], 0.0]
            for i in np.flatnonzero(early & positive).tolist():
                held = self._pending.get(int(example_id[i]))
                if held is None:  # its negative was never seen here: score the copy itself
                    self.unmatched_copies += 1
                    keep.append((logits[i], 1.0, rates[i], truth[i]))
                elif held[4] == 0.0:  # a second positive kind's copy is a duplicate: once
                    held[4] = 1.0
            parts = [Scored(logits[now_idx], labels[now_idx], rates[now_idx], truth[now_idx])]
            if keep:
                a = np.asarray(keep, np.float64)
                parts.append(Scored(a[:, 0], a[:, 1], a[:, 2], a[:, 3]))
            out = _concat(parts)
        newest = int(np.max(event_time_ms)) if len(event_time_ms) else None
        expired = self._expire(newest)
        return _concat([out, expired]) if len(expired) else out

    def _expire(self, newest_ms: int | None) -> Scored:
        """Early rows no click can follow any more, in emission order, with their final label."""
        rows = []
        while self._pending:
            key, (t, logit, rate, truth, label) = next(iter(self._pending.items()))
            if len(self._pending) <= self.max_pending and (newest_ms is None or t > newest_ms - self.wait_ms):
                break
            del self._pending[key]
            rows.append((logit, label, rate, truth))
        clicked = sum(1 for r in rows if r[1] > 0)
        self.resolved_positive += clicked
        self.resolved_negative += len(rows) - clicked
        if not rows:
            return Scored(*(np.zeros(0) for _ in range(4)))
        a = np.asarray(rows, np.float64)
        return Scored(a[:, 0], a[:, 1], a[:, 2], a[:, 3])

    def summary(self) -> dict[str, int]:
        return {"pending": len(self._pending),
                "pending_clicked": sum(1 for e in self._pending.values() if e[4] > 0),
                "resolved_positive": self.resolved_positive,
                "resolved_negative": self.resolved_negative, "unmatched_copies": self.unmatched_copies}


def _concat(parts: list[Scored]) -> Scored:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Scored(*(np.zeros(0) for _ in range(4)))
    if len(parts) == 1:
        return parts[0]
    return Scored(*(np.concatenate([getattr(p, f) for p in parts])
                    for f in ("logits", "labels", "sample_rate", "truth_p")))
