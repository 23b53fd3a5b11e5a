"""The publish guard: every update is checked before it leaves the trainer for ``hw.params``.

A burst of poisoned or broken feedback (labels flipped, a NaN from a bad dense value, an exploding
row) must not reach serving a second later. :class:`PublishGuard` is asked by the publisher
(:class:`training.sync.DeltaPublisher`) before each sparse delta, dense tower and snapshot, and
by the trainer before each checkpoint. A check fails (reason in brackets) when

- a row about to be published holds a NaN or an infinity (``nonfinite_rows``), or the dense
  tower does (``nonfinite_tower``);
- a row's L2 norm exceeds ``--guard-max-row-norm`` (``row_norm``; the per-id counter columns,
  which are counts, are left out) or one tower tensor's exceeds ``--guard-max-tower-norm``
  (``tower_norm``);
- the prequential AUC of the newest ``--guard-window`` examples (each scored *before* the model
  trained on it) is more than ``--guard-auc-drop`` below that of the last good window
  (``auc``), or its log loss more than ``--guard-logloss-rise`` above what the last good window's
  would be at this window's click rate (``logloss``: the reference's normalized entropy, its log
  loss over the entropy of its own click rate, times that entropy at the window's rate; He et al.,
  "Practical Lessons from Predicting Clicks on Ads at Facebook", 2014). Log loss moves with the
  click rate: one calibrated model scores 0.19 at 6% clicks and 0.45 at 22%, so a raw comparison held
  every update back through a day's click-rate swing, for good where nothing could roll back. The
  reference is a window that passed, renewed only once a passing window no longer overlaps it,
  so a slow slide is measured against a fixed point rather than against itself. With fewer
  examples than the window since the start or the last failure the quality check is *not
  judged* (it does not fail); after a restart the reference is the restored run-long figures.

What happens then, the rule:

1. A failing update is **held back**: nothing is sent, the failure is logged (WARNING, with the
   figures), counted (``hw_train_guard_failures_total{reason}``) and shown on the dashboard
   (``hw_train_guard_holding`` is 1). Training goes on.
2. While holding, nothing is published and **no checkpoint is written** (a checkpoint must never
   capture a state the guard rejected; offsets are not committed either, so a crash now replays
   from the last good checkpoint). The guard checks again at the sparse cadence; the quality
   window restarts at each failure, so it judges fresh examples.
3. The first check that passes with a judged window releases the hold: everything changed since
   the last published version goes out (rows are values, so nothing is lost), the tower with it.
4. After ``--guard-max-failures`` consecutive failing checks, or at once when the trainer's own
   state is non-finite (NaN weights never heal by training), the trainer **rolls back**: it
   reloads its newest checkpoint (table, tower, optimizer, de-dup filter, evaluator), keeps its
   place in ``hw.examples`` (the examples since that checkpoint, the burst among them, are
   skipped, not retrained), raises the table version above everything published, and publishes
   a full snapshot, which every replica loads in place of what it has. Without a checkpoint to go
   back to (no ``--checkpoint-dir``) it logs an ERROR and keeps holding until a check passes.

Bad input that would poison the state outright is refused before training by
:func:`screen_examples` (non-finite dense values, labels outside [0, 1], sample rates outside
(0, 1]): those rows go to ``hw.dlq``, counted by ``hw_train_rejected_examples_total{reason}``.

The multi-rank trainer does not guard its updates yet.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

__all__ = ["GuardConfig", "Verdict", "WindowFigures", "PublishGuard", "REASONS", "screen_examples",
           "restore_last_good"]

NONFINITE_ROWS, NONFINITE_TOWER = "nonfinite_rows", "nonfinite_tower"
ROW_NORM, TOWER_NORM, AUC, LOGLOSS = "row_norm", "tower_norm", "auc", "logloss"
REASONS = (NONFINITE_ROWS, NONFINITE_TOWER, ROW_NORM, TOWER_NORM, AUC, LOGLOSS)
WAITING = "waiting"  # holding, and the window is too small to judge yet: no publish, no failure

FAILURES = Counter("hw_train_guard_failures", "updates the publish guard held back, by reason", ["reason"])
HOLDING = Gauge("hw_train_guard_holding", "1 while the publish guard holds every update back")
ROLLBACKS = Counter("hw_train_guard_rollbacks", "trainer rollbacks to the last good checkpoint")
REJECTED = Counter("hw_train_rejected_examples", "examples refused before training as bad input", ["reason"])


@dataclass
class GuardConfig:
    """Limits and margins of the guard (a view of the trainer config; 0 turns a check off)."""

    max_row_norm: float = 100.0
    max_tower_norm: float = 1000.0
    auc_drop: float = 0.1
    logloss_rise: float = 0.1
    window: int = 20_000
    max_failures: int = 3

    @classmethod
    def from_trainer(cls, cfg: Any) -> "GuardConfig":
        return cls(max_row_norm=cfg.guard_max_row_norm, max_tower_norm=cfg.guard_max_tower_norm,
                   auc_drop=cfg.guard_auc_drop, logloss_rise=cfg.guard_logloss_rise,
                   window=cfg.guard_window, max_failures=cfg.guard_max_failures)

    @property
    def judges_quality(self) -> bool:
        return self.auc_drop > 0 or self.logloss_rise > 0


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: ``ok`` to publish, else a ``reason`` (one of :data:`REASONS`, or
    ``waiting`` while a hold waits for a judged window) and a message with the figures."""

    ok: bool
    reason: str = ""
    message: str = ""
    judged: bool = False  # the quality check had its say (a big enough window, or it is off)


@dataclass(frozen=True)
class WindowFigures:
    """Prequential figures of the examples ``(start_n, end_n]`` of the run."""

    auc: float
    logloss: float
    start_n: int
    end_n: int
    positive_rate: float = float("nan")  # weighted, as the log loss

    def __str__(self) -> str:
        return (f"AUC {self.auc:.4f}, logloss {self.logloss:.4f} at click rate {self.positive_rate:.4f} "
                f"over {self.end_n - self.start_n} examples")

    def logloss_at(self, rate: float) -> float:
        """This window's log loss carried to click rate ``rate``: its normalized entropy times
        the entropy of ``rate`` (its own log loss where either rate is unknown or degenerate)."""
        here, there = _entropy(self.positive_rate), _entropy(rate)
        if not (math.isfinite(here) and math.isfinite(there)) or here <= 0:
            return self.logloss
        return self.logloss / here * there


def _entropy(rate: float) -> float:
    """Log loss of always predicting ``rate`` on labels with that mean (nats); NaN if unknown."""
    if not math.isfinite(rate) or rate < 0 or rate > 1:
        return float("nan")
    if rate in (0.0, 1.0):
        return 0.0
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


@dataclass(eq=False)
class _Mark:
    """A copy of the evaluator's cumulative accumulator at one moment (windows are differences)."""

    n: int
    pos: np.ndarray
    neg: np.ndarray
    loss: float
    weight: float
    labels: float = float("nan")

    @classmethod
    def of(cls, acc: Any) -> "_Mark":
        return cls(int(acc.n), acc.pos.copy(), acc.neg.copy(), float(acc.loss_sum), float(acc.weight_sum),
                   float(getattr(acc, "label_sum", float("nan"))))

    def since(self, old: "_Mark") -> WindowFigures:
        pos, neg = self.pos - old.pos, self.neg - old.neg
        p, q = pos.sum(), neg.sum()
        auc = float("nan")
        if p > 0 and q > 0:  # BinnedAUC.auc on the difference of two histograms
            auc = float((pos * (np.cumsum(neg) - neg + 0.5 * neg)).sum() / (p * q))
        w = self.weight - old.weight
        if w <= 0:
            return WindowFigures(auc, float("nan"), old.n, self.n)
        return WindowFigures(auc, (self.loss - old.loss) / w, old.n, self.n, (self.labels - old.labels) / w)


@dataclass
class PublishGuard:
    """Checks updates before they are published and keeps the hold / rollback state (module doc).

    ``tower`` returns the dense tower to check, ``quality`` the evaluator's cumulative learner
    accumulator (``training.evaluation.BinnedAUC``); both are read at each check, so they may
    change under the guard (a rollback replaces them).
    """

    cfg: GuardConfig
    tower: Callable[[], Any] = lambda: None
    quality: Callable[[], Any] = lambda: None
    holding: bool = False
    consecutive_failures: int = 0
    nonfinite: bool = False  # the last failure was a non-finite state: roll back at once
    failures: dict[str, int] = field(default_factory=dict)
    rollbacks: int = 0
    last_failure: str = ""
    baseline: WindowFigures | None = None
    _marks: list[_Mark] = field(default_factory=list)
    _cannot_roll_back: bool = False

    # -- the check -------------------------------------------------------------------------
    def check(self, delta: Any | None, slots: dict[str, Any] | None, what: str) -> Verdict:
        """Checks ``delta`` (an ``embedding_store.TableDelta`` about to be published, or None for
        a dense-only publish; ``slots`` the table's slot configs), the tower and the quality
        window, and updates the hold state. ``what`` names the publish in the log."""
        verdict = (self._rows(delta, slots or {}) if delta is not None else None) or self._tower()
        figures = None
        if verdict is None:
            verdict, figures = self._quality()
        if not verdict.ok:
            self._failed(verdict, what)
            return verdict
        if self.holding and not verdict.judged:
            return Verdict(False, WAITING, f"holding: waiting for {self.cfg.window} examples to judge",
                           judged=False)
        # A window of one class only (no AUC: e.g. the first seconds of an early-emitting joiner,
        # before any click came) passes, but never becomes the reference: its log loss is ~0.
        if figures is not None and math.isfinite(figures.auc) and (
                self.baseline is None or figures.start_n >= self.baseline.end_n):
            self.baseline = figures
        if self.holding:
            log.warning("publish guard: %s passes again (%s); publishing resumes", what,
                        figures or "quality not judged")
        self.holding, self.consecutive_failures, self.nonfinite = False, 0, False
        self._cannot_roll_back = False
        HOLDING.set(0)
        return verdict

    def _failed(self, verdict: Verdict, what: str) -> None:
        self.holding = True
        self.consecutive_failures += 1
        self.nonfinite = verdict.reason in (NONFINITE_ROWS, NONFINITE_TOWER)
        self.failures[verdict.reason] = self.failures.get(verdict.reason, 0) + 1
        self.last_failure = verdict.message
        FAILURES.labels(reason=verdict.reason).inc()
        HOLDING.set(1)
        n = self.consecutive_failures
        # A hold that lasts is re-checked every second: say so at the start, then now and then.
        (log.warning if n <= 3 or n % 60 == 0 else log.debug)(
            "publish guard: %s held back [%s] %s (%d in a row)", what, verdict.reason, verdict.message, n)
        acc = self.quality()  # the next window judges fresh examples only
        self._marks = [_Mark.of(acc)] if acc is not None else []

    def _rows(self, delta: Any, slots: dict[str, Any]) -> Verdict | None:
        worst, where = 0.0, ""
        for name, sd in delta.slots.items():
            values = sd.values
            if values.numel() == 0:
                continue
            finite = torch.isfinite(values).all(dim=1)
            if not bool(finite.all()):
                bad = sd.ids[~finite.numpy()]
                return Verdict(False, NONFINITE_ROWS, f"{bad.size} rows of slot {name} hold NaN/inf "
                               f"(ids {bad[:5].tolist()}{'...' if bad.size > 5 else ''})")
            if self.cfg.max_row_norm > 0:
                counters = getattr(slots.get(name), "counter_columns", 0)
                norms = values[:, :values.shape[1] - counters].float().norm(dim=1)
                i = int(norms.argmax())
                if float(norms[i]) > worst:
                    worst, where = float(norms[i]), f"slot {name} id {int(sd.ids[i])}"
        if worst > self.cfg.max_row_norm > 0:
            return Verdict(False, ROW_NORM, f"row norm {worst:.4g} at {where} exceeds {self.cfg.max_row_norm:g}")
        return None

    def _tower(self) -> Verdict | None:
        tower = self.tower()
        if tower is None:
            return None
        worst, where = 0.0, ""
        for name, t in tower.state_dict().items():
            if not t.is_floating_point() or t.numel() == 0:
                continue
            if not bool(torch.isfinite(t).all()):
                return Verdict(False, NONFINITE_TOWER, f"tower tensor {name} holds NaN/inf")
            norm = float(t.float().norm())
            if norm > worst:
                worst, where = norm, name
        if worst > self.cfg.max_tower_norm > 0:
            return Verdict(False, TOWER_NORM, f"tower tensor {where} has norm {worst:.4g}, "
                           f"over {self.cfg.max_tower_norm:g}")
        return None

    def _quality(self) -> tuple[Verdict, WindowFigures | None]:
        acc = self.quality() if self.cfg.judges_quality else None
        if acc is None:
            return Verdict(True, judged=True), None
        now = _Mark.of(acc)
        if self._marks and now.n < self._marks[-1].n:  # a new accumulator (rolled back)
            self._marks = []
        if not self._marks:
            self._marks = [now]
            if self.baseline is None and now.n >= self.cfg.window:  # restored: run-long figures
                whole = now.since(_Mark(0, np.zeros_like(now.pos), np.zeros_like(now.neg), 0.0, 0.0, 0.0))
                self.baseline = whole if math.isfinite(whole.auc) else None
            return Verdict(True, judged=False), None
        base = next((m for m in reversed(self._marks) if now.n - m.n >= self.cfg.window), None)
        if now.n - self._marks[-1].n >= max(self.cfg.window // 8, 1):
            self._marks.append(now)
        if base is None:
            return Verdict(True, judged=False), None
        self._marks = self._marks[self._marks.index(base):]  # older marks are never needed again
        fig = now.since(base)
        ref = self.baseline
        if ref is not None:
            if self.cfg.auc_drop > 0 and ref.auc - fig.auc > self.cfg.auc_drop:
                return Verdict(False, AUC, f"window {fig}; last good window AUC {ref.auc:.4f} "
                               f"(allowed drop {self.cfg.auc_drop:g})", judged=True), fig
            expected = ref.logloss_at(fig.positive_rate)
            if self.cfg.logloss_rise > 0 and fig.logloss - expected > self.cfg.logloss_rise:
                return Verdict(False, LOGLOSS, f"window {fig}; last good window logloss "
                               f"{ref.logloss:.4f}, {expected:.4f} at this click rate "
                               f"(allowed rise {self.cfg.logloss_rise:g})",
                               judged=True), fig
        return Verdict(True, judged=True), fig

    # -- the rollback rule ---------------------------------------------------------------------
    @property
    def rollback_due(self) -> bool:
        """The hold cannot be waited out: roll the trainer back (module doc, rule 4)."""
        if not self.holding or self._cannot_roll_back:
            return False
        return self.nonfinite or 0 < self.cfg.max_failures <= self.consecutive_failures

    def rolled_back(self, ok: bool, detail: str = "") -> None:
        """The trainer's report: ``ok`` it restored a good state (publishing resumes with a
        snapshot of it), else there was nothing to go back to (keep holding, alert once)."""
        if not ok:
            self._cannot_roll_back = True
            log.error("publish guard: cannot roll back (%s); every update stays held back until a "
                      "check passes", detail or "no checkpoint")
            return
        self.rollbacks += 1
        ROLLBACKS.inc()
        self.holding, self.consecutive_failures, self.nonfinite = False, 0, False
        self._marks = []  # the restored evaluator counts from its checkpoint: windows start again
        if self.baseline is not None:  # same reference figures, re-anchored to the restored count
            self.baseline = replace(self.baseline, start_n=0, end_n=0)
        HOLDING.set(0)

    def summary(self) -> dict:
        """JSON-ready state for the trainer's summary line."""
        return {"holding": self.holding, "consecutive_failures": self.consecutive_failures,
                "failures": dict(self.failures), "rollbacks": self.rollbacks,
                "last_failure": self.last_failure,
                "baseline_auc": None if self.baseline is None else self.baseline.auc}


def screen_examples(batch: Any, where: str = "") -> tuple[Any, Any | None]:
    """``(clean, rejected)``: ``batch`` without the rows that would poison training outright
    (non-finite dense values, labels outside [0, 1], sample rates outside (0, 1]) and those rows
    (None when there are none), logged and counted by reason."""
    n = len(batch)
    if n == 0:
        return batch, None
    dense_ok = np.isfinite(batch.dense).all(axis=1) if batch.dense.size else np.ones(n, bool)
    label_ok = np.isfinite(batch.label) & (batch.label >= 0) & (batch.label <= 1)
    rate_ok = np.isfinite(batch.sample_rate) & (batch.sample_rate > 0) & (batch.sample_rate <= 1)
    ok = dense_ok & label_ok & rate_ok
    if ok.all():
        return batch, None
    counts = {"nonfinite_dense": int((~dense_ok).sum()), "bad_label": int((~label_ok).sum()),
              "bad_sample_rate": int((~rate_ok).sum())}
    for reason, k in counts.items():
        if k:
            REJECTED.labels(reason=reason).inc(k)
    log.warning("refused %d of %d examples of %s as bad input (%s); sent to the DLQ", int((~ok).sum()),
                n, where or "a batch", ", ".join(f"{k} {r}" for r, k in counts.items() if k))
    return batch.take(ok), batch.take(~ok)


def restore_last_good(cfg: Any, store: Any, above_version: int) -> Any | None:
    """A ``Learner`` from the newest checkpoint of ``store`` whose table version is raised above
    ``above_version`` (so replicas see versions only grow); None without a checkpoint."""
    if store is None:
        return None
    from embedding_store import EmbeddingTable

    from training.learner import Learner

    manifest = store.latest()
    if manifest is None:
        return None
    table = EmbeddingTable.load(str(store.table_path_of(manifest)), device=cfg.device)
    tensors, meta = store.load_state(manifest)
    learner = Learner.restore(cfg, table, tensors, meta)
    table.version = max(int(table.version), int(above_version)) + 1
    log.warning("rolled back to checkpoint %d (%d examples trained, watermark %d); table version "
                "now %d", manifest.seq, manifest.examples_trained, manifest.watermark_ms, table.version)
    return learner
