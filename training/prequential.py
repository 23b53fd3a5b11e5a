"""Learning check without a broker: example batches -> Learner (and baselines), test-then-train.

One prequential loop, :func:`run_stream`, for every source of examples: the synthetic world
(:meth:`SyntheticStream.examples`, the same examples the joiner would put on ``hw.examples``,
see :func:`run_prequential`) or a real log (:func:`streams.log_reader.log_examples`, see
:func:`run_log`). Each example goes once, in event-time order, in mini-batches of
``cfg.batch_size``, to a fresh :class:`~training.learner.Learner` (scored by its own evaluator
before the update) and to each online baseline (scored before it learns the row). It answers
"can our model learn this stream, how close does it get to the truth, and does it beat simple
online models on the very same examples?" in seconds; ``headwater demo`` then confirms it
through Kafka and the joiner.

Every model's scores are kept in stream order and measured the same way at the end, with the
evaluator's :class:`~training.evaluation.BinnedAUC`: AUC and log loss over the whole run, and
AUC over the last :data:`LAST_FRACTION` of the examples (by position in time order).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from streams.events import ExampleBatch
from streams.generator import GeneratorConfig, SyntheticStream
from training.batching import warm_batch_rows
from training.config import TrainerConfig
from training.dedup import SeenFilter
from training.evaluation import BinnedAUC, PrequentialEvaluator, grouped_auc
from training.learner import Learner

if TYPE_CHECKING:
    from streams.log_reader import EncodedLog
    from training.baselines import OnlineBaseline

__all__ = ["LAST_FRACTION", "Metrics", "StreamResult", "LearningResult", "run_stream",
           "run_prequential", "run_log", "metrics_of"]

LAST_FRACTION = 0.1  # "last window" of the stream figures: the last 10% of the examples


@dataclass
class Metrics:
    """Prequential figures of one model over one run (NaN where undefined, e.g. one class)."""

    auc_overall: float
    auc_last_window: float
    logloss: float
    gauc: float = float("nan")  # AUC within each request, averaged (see grouped_auc)

    def to_dict(self) -> dict:
        return {k: (None if math.isnan(v) else round(v, 4)) for k, v in
                (("auc_overall", self.auc_overall), ("auc_last_window", self.auc_last_window),
                 ("logloss", self.logloss), ("gauc", self.gauc))}


def metrics_of(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray,
               last_fraction: float = LAST_FRACTION, requests: np.ndarray | None = None) -> Metrics:
    """AUC and weighted log loss over all rows, AUC over the last ``last_fraction`` of them,
    and, given each row's request (group ids), the AUC within requests (GAUC, unweighted)."""
    overall, last = BinnedAUC(), BinnedAUC()
    overall.update(logits, labels, weights)
    tail = max(1, int(math.ceil(last_fraction * len(logits)))) if len(logits) else 0
    last.update(logits[len(logits) - tail:], labels[len(logits) - tail:],
                weights[len(logits) - tail:])
    gauc = grouped_auc(logits, labels, requests)[0] if requests is not None else float("nan")
    return Metrics(overall.auc(), last.auc(), overall.logloss(), gauc)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


class _RecordingEvaluator(PrequentialEvaluator):
    """The learner's evaluator, also keeping the pre-update logits it is given (stream order)."""

    def __init__(self, window_examples: int) -> None:
        super().__init__(window_examples)
        self.logits: list[np.ndarray] = []
        self.rows = 0

    def update(self, logits: np.ndarray, labels: np.ndarray, sample_rate: np.ndarray | None = None,
               truth_p: np.ndarray | None = None) -> None:
        self.logits.append(np.asarray(logits, np.float32).copy())
        self.rows += len(self.logits[-1])
        super().update(logits, labels, sample_rate, truth_p)


@dataclass
class StreamResult:
    """What one prequential run over a stream measured, for the learner and each baseline."""

    examples: int
    learner: Metrics
    truth: Metrics | None  # the hidden truth's figures on the same rows, where every row has it
    baselines: dict[str, Metrics]
    learner_seconds: float  # time inside Learner.train only
    baseline_seconds: dict[str, float]
    seconds: float  # the whole loop, reading the source included
    positives_rate: float
    evaluator: PrequentialEvaluator  # the learner's, with its eval_window windows
    gauc_requests: int = 0  # requests holding a positive and a negative: what gauc averages over
    unscored_first_sightings: int = 0  # rows trained on, not scored: an item's first row (run_stream)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.learner_seconds if self.learner_seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        """The bench's fields: learner figures at top level, baselines by name."""
        out = {"examples": self.examples, **self.learner.to_dict(),
               "examples_per_s": round(self.examples_per_s, 1),
               "baselines": {k: m.to_dict() for k, m in self.baselines.items()},
               "baseline_examples_per_s": {k: round(self.examples / s, 1) if s > 0 else None
                                           for k, s in self.baseline_seconds.items()},
               "positives_rate": round(self.positives_rate, 5), "seconds": round(self.seconds, 2),
               "gauc_requests": self.gauc_requests, "unscored_first_sightings": self.unscored_first_sightings}
        if self.truth is not None:
            out["auc_truth_overall"] = self.truth.to_dict()["auc_overall"]
            out["auc_truth_last_window"] = self.truth.to_dict()["auc_last_window"]
            out["gauc_truth"] = self.truth.to_dict()["gauc"]
        return out


def _rebatch(batches: Iterable[ExampleBatch], size: int, warmup_rows: int = 0) -> Iterator[ExampleBatch]:
    """Batches in stream order of the trainer's sizes: ``size`` rows, or fewer while the first
    ``warmup_rows`` are fed (:func:`~training.batching.warm_batch_rows`); the last may be shorter."""
    pending: list[ExampleBatch] = []
    rows = fed = 0
    for b in batches:
        if not len(b):
            continue
        pending.append(b)
        rows += len(b)
        want = warm_batch_rows(size, fed, warmup_rows)
        if rows < want:
            continue
        batch = ExampleBatch.concat(pending) if len(pending) > 1 else pending[0]
        start = 0
        while len(batch) - start >= want:
            yield batch.take(np.arange(start, start + want))
            start, fed = start + want, fed + want
            want = warm_batch_rows(size, fed, warmup_rows)
        pending = [batch.take(np.arange(start, len(batch)))] if start < len(batch) else []
        rows = len(batch) - start
    if rows:
        yield ExampleBatch.concat(pending)


def run_stream(batches: Iterable[ExampleBatch], cfg: TrainerConfig,
               baselines: Sequence["OnlineBaseline"] = (),
               on_batch: Callable[[ExampleBatch], None] | None = None,
               score_first_sightings: bool = True) -> StreamResult:
    """Feeds every example of ``batches`` once, in order, to a fresh learner and ``baselines``.

    Duplicate example ids are dropped here, once, before any model sees the batch (the
    learner's own de-dup then finds nothing to drop), so every model is scored on exactly the
    same rows. ``on_batch`` is called with each source batch as it is read (progress). Without
    ``score_first_sightings`` (a log of positives only, its negatives sampled among the items
    seen before), a row whose item was never seen before is trained on but not scored, by any
    model: such a row can only be a positive, so "a new item is a positive" would count as
    learning (0.74 AUC on a log of random users and items, whose truth is 0.5).
    """
    threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        return _run_stream(batches, cfg, baselines, on_batch, score_first_sightings)
    finally:
        torch.set_num_threads(threads)


def _tap(batches: Iterable[ExampleBatch], fn: Callable[[ExampleBatch], None] | None
         ) -> Iterator[ExampleBatch]:
    for b in batches:
        if fn is not None:
            fn(b)
        yield b


def _first_sightings(items: np.ndarray, seen: set[int]) -> np.ndarray:
    """bool per row: its item's first row in the stream (``seen``: items of earlier rows, updated)."""
    _, first = np.unique(items, return_index=True)
    new = np.zeros(len(items), bool)
    new[first] = [int(i) not in seen for i in items[first].tolist()]
    seen.update(items[first].tolist())
    return new


def _run_stream(batches: Iterable[ExampleBatch], cfg: TrainerConfig,
                baselines: Sequence["OnlineBaseline"],
                on_batch: Callable[[ExampleBatch], None] | None,
                score_first_sightings: bool = True) -> StreamResult:
    t0 = time.perf_counter()
    seen = SeenFilter(cfg.dedup_capacity, generations=2)
    learner: Learner | None = None
    recorder = _RecordingEvaluator(cfg.eval_window)
    labels: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    request: list[np.ndarray] = []  # (user, event time) of each row: its request
    first_sighting: list[np.ndarray] = []  # rows whose item no earlier row had
    items_seen: set[int] = set()
    scores: dict[str, list[np.ndarray]] = {b.name: [] for b in baselines}
    spent = {b.name: 0.0 for b in baselines}
    learner_s = 0.0
    for batch in _rebatch(_tap(batches, on_batch), cfg.batch_size, cfg.batch_warmup_rows):
        keep = seen.filter_new(batch.example_id)
        if not keep.all():
            batch = batch.take(keep)
        if not len(batch):
            continue
        if learner is None:
            learner = Learner.for_batch(cfg, batch)
            learner.evaluator = recorder
            learner.early_labels = None  # every row's score recorded as given (bench/delayed.py
            # scores an early stream on final labels itself)
        before = recorder.rows
        t = time.perf_counter()
        learner.train(batch)
        learner_s += time.perf_counter() - t
        if recorder.rows - before != len(batch):
            raise RuntimeError("the learner scored a different number of rows than it was given")
        for b in baselines:
            t = time.perf_counter()
            p = b.update(batch)
            spent[b.name] += time.perf_counter() - t
            scores[b.name].append(_logit(p).astype(np.float32))
        labels.append(np.asarray(batch.label, np.float32))
        weights.append(1.0 / np.clip(np.asarray(batch.sample_rate, np.float64), 1e-6, None))
        truth.append(np.asarray(batch.truth_p, np.float32))
        first_sighting.append(_first_sightings(np.asarray(batch.item_id, np.int64), items_seen))
        request.append(np.stack([np.asarray(batch.user_id, np.int64), np.asarray(batch.event_time_ms, np.int64)], 1))
    if learner is None:
        raise ValueError("the stream held no examples")
    y, w, tp = np.concatenate(labels), np.concatenate(weights), np.concatenate(truth)
    req = np.unique(np.concatenate(request), axis=0, return_inverse=True)[1].reshape(-1)
    unscored = np.concatenate(first_sighting) if not score_first_sightings else np.zeros(len(y), bool)
    on = ~unscored  # the rows every model is measured on

    def measured(logits: np.ndarray) -> Metrics:
        return metrics_of(logits[on], y[on], w[on], requests=req[on])

    truth_m = measured(_logit(tp)) if len(tp) and not np.isnan(tp).any() else None
    return StreamResult(
        examples=len(y), learner=measured(np.concatenate(recorder.logits)), truth=truth_m,
        baselines={k: measured(np.concatenate(v)) for k, v in scores.items()},
        learner_seconds=learner_s, baseline_seconds=spent, seconds=time.perf_counter() - t0,
        positives_rate=float((w * y).sum() / w.sum()), evaluator=recorder,
        gauc_requests=int(((np.bincount(req[on], weights=y[on]) > 0)
                           & (np.bincount(req[on], weights=1 - y[on]) > 0)).sum()),
        unscored_first_sightings=int(unscored.sum()))


def run_log(log: "EncodedLog", source: str, cfg: TrainerConfig,
            baselines: Sequence["OnlineBaseline"] = (),
            on_progress: Callable[[int], None] | None = None) -> StreamResult:
    """Every row of an encoded log, in event-time order, through :func:`run_stream`, as the
    examples the joiner would build from it (:func:`streams.log_reader.log_examples`);
    ``on_progress`` gets the rows read so far. A log of positives only is scored without its
    items' first rows (:func:`run_stream`)."""
    from streams.log_reader import log_examples

    read = 0

    def count(b: ExampleBatch) -> None:
        nonlocal read
        read += len(b)
        if on_progress is not None:
            on_progress(read)

    return run_stream(log_examples(log, source, cfg.batch_size), cfg, baselines, count,
                      score_first_sightings=not log.schema.implicit)


@dataclass
class LearningResult:
    """What a prequential run on the synthetic world reached.

    ``auc_last_window``/``auc_truth_last_window`` here are the learner's last full
    ``eval_window`` (as the trainer's evaluator reports them); ``stream`` holds the figures of
    :class:`StreamResult`, the last window there being the last 10% of the examples.
    """

    events: int
    examples: int
    auc_last_window: float
    auc_truth_last_window: float
    auc_overall: float
    auc_truth_overall: float
    seconds: float
    window_gaps: list[float]  # truth AUC - learner AUC per finished window, oldest first
    stream: StreamResult | None = field(default=None, repr=False)

    @property
    def auc_gap(self) -> float:
        """How far the learner's last window is below the ground truth on the same examples."""
        return self.auc_truth_last_window - self.auc_last_window

    def to_dict(self) -> dict:
        return {"events": self.events, "examples": self.examples,
                "auc_last_window": round(self.auc_last_window, 4),
                "auc_truth_last_window": round(self.auc_truth_last_window, 4),
                "auc_gap": round(self.auc_gap, 4), "auc_overall": round(self.auc_overall, 4),
                "auc_truth_overall": round(self.auc_truth_overall, 4),
                "seconds": round(self.seconds, 2)}


def run_prequential(world: GeneratorConfig, cfg: TrainerConfig, events: int,
                    block_requests: int = 256,
                    on_progress: Callable[[int], None] | None = None,
                    baselines: Sequence["OnlineBaseline"] = ()) -> LearningResult:
    """Streams ``events`` events of ``world`` (shown items + clicks) through a fresh learner
    (and ``baselines``); ``on_progress`` gets the events generated so far."""
    stream = SyntheticStream(world)
    seen = 0

    def blocks() -> Iterator[ExampleBatch]:
        nonlocal seen
        while seen < events:
            block = stream.block(block_requests)
            seen += stream.count_events(block)
            yield stream.examples(block)
            if on_progress is not None:
                on_progress(seen)

    res = run_stream(blocks(), cfg, baselines)
    ev = res.evaluator
    last = ev.windows[-1] if ev.windows else ev.window.result(0)
    overall = ev.overall.result(-1)
    return LearningResult(seen, res.examples, last.auc, last.truth_auc, overall.auc,
                          overall.truth_auc, res.seconds,
                          [w.truth_auc - w.auc for w in ev.windows], res)
