"""``headwater bench learning --emit early|both``: early emission + correction against the windowed
join, on the generator (truth known) or on a real log (``--dataset``), in one run.

The same impressions and clicks go through the joiner's own emission logic
(:func:`~streams.join_build.build_examples` for ``window``, :func:`~streams.join_build.build_early`
for ``early``), and the rows reach a fresh learner in the order the joiner would emit them: a
windowed example at its request's window close, an early negative at the hold, a positive copy
at its click (or at the hold, for a click within it). Arms: ``window``, ``early_fnw`` (the
trainer's default correction) and ``early_none`` (no correction).

A log has no click times (its clicks come 1 ms after the impression, :func:`log_requests`), so
each of its clicks is given a delay drawn uniformly in [1, ``max_action_delay_ms``] (seeded), as
the generator's are; the log replays in its own event time.

Every arm is scored on each impression's true final label (its click if one comes within the
window, else 0), each impression once:

- ``auc_overall``, ``logloss``, ``calibration``: prequentially, by the model as it stood when the
  item was first trained (early arms: its negative's pre-update score; the positive copy is not
  scored again; a row the learner's cold-start hold keeps, ``early_warmup_examples``, is scored
  when it is trained). This favours the window: it scores at window close, with every click of
  the window before it already learned. ``auc_by_tenth`` / ``logloss_by_tenth``: the same on
  each tenth of the impressions by event time (early arms: ``auc_by_tenth_delta_vs_window``).
- ``auc_after_warmup``, ``logloss_after_warmup``, ``calibration_after_warmup``: the same scores
  on the second half of the impressions (by event time). An early stream's first seconds are
  all fake negatives (no click has come yet), which a cold model learns and then unlearns for
  a while; a trainer restored from a checkpoint never sees that start again.
- ``serving_auc``, ``serving_logloss``, ``serving_calibration``: at the impression's own event
  time, by the model trained on what had been emitted by then (serving's view, publish delay
  left out), over the second half of the stream (the first is warm-up) where every arm's
  serving is open (its learner has trained and is past the cold-start hold, as the demo opens
  serving; ``serving_probes`` of them): the freshness the window costs counts here.

``calibration`` = mean predicted probability / positive rate on those rows (1 = calibrated).
``cold_start_hold``: the hold's counts (:class:`~training.delayed_feedback.ColdStartHold`; null
when off): rows held, copies merged into them, and the event time at which the learner was warm.

The early arms' label wait (``early_label_wait_s``) is the join window unless given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import msgpack
import numpy as np

from streams.events import ExampleBatch
from streams.generator import GeneratorConfig, SyntheticStream
from streams.join_build import ClosedRequest, build_early, build_examples
from streams.join_state import PendingAction

__all__ = ["ARMS", "run_arms", "generator_source", "log_source"]

ARMS = ("window", "early_fnw", "early_none")
_POSITIVE = frozenset({"click"})
_NEVER = np.iinfo(np.int64).max


@dataclass
class _Stream:
    """Rows in emission order, with each row's true label and whether it is its item's first."""

    batch: ExampleBatch
    true_label: np.ndarray
    first: np.ndarray
    times: np.ndarray  # emission event time of each row (ms)


Source = Callable[[str], "_Stream"]  # emit mode ("window" | "early") -> the rows it emits


def _click_times(reqs: list[ClosedRequest]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the requests' examples (requests in order, items in shown order): the
    impression's time and its item's first positive action's time (``_NEVER`` if none)."""
    t_imp, click = [], []
    for c in reqs:
        items = c.impression["items"]
        t = int(c.impression["event_time_ms"])
        first = {}
        for a in c.actions:
            if a.kind in _POSITIVE:
                first[a.item_id] = min(first.get(a.item_id, _NEVER), a.event_time_ms)
        t_imp.append(np.full(len(items), t, np.int64))
        # pop: an item shown twice is labelled once, on its first row (as the joiner does)
        click.append(np.fromiter((first.pop(i, _NEVER) for i in items), np.int64, len(items)))
    return np.concatenate(t_imp), np.concatenate(click)


def _emit(reqs: list[ClosedRequest], emit: str, window_ms: int, hold_ms: int, dense_dim: int
          ) -> tuple[ExampleBatch, np.ndarray, np.ndarray, np.ndarray]:
    """One block of requests as mode ``emit`` sends it: (rows, emission times, true labels,
    first-of-impression flags), rows in the order the join functions build them."""
    t_imp, click = _click_times(reqs)
    label = (click != _NEVER) & (click - t_imp <= window_ms)
    if emit == "window":
        batch, _, _ = build_examples(reqs, window_ms, _POSITIVE, 1.0, dense_dim)
        return batch, t_imp + window_ms, label, np.ones(len(batch), bool)
    batch, _, _ = build_early(reqs, window_ms, _POSITIVE, 1.0, dense_dim)  # n negatives, then copies
    n, k = len(label), int(label.sum())
    if len(batch) != n + k:
        raise RuntimeError(f"{len(batch) - n} positive copies for {k} clicked rows")
    times = np.concatenate([t_imp + hold_ms, np.maximum(click[label], t_imp[label] + hold_ms)])
    return (batch, times, np.concatenate([label, np.ones(k, bool)]),
            np.concatenate([np.ones(n, bool), np.zeros(k, bool)]))


def _collect(blocks: Iterator[list[ClosedRequest]], emit: str, window_ms: int, hold_ms: int,
             dense_dim: int = 0) -> _Stream:
    parts, times, truth, first = [], [], [], []
    for reqs in blocks:
        b, t, y, f = _emit(reqs, emit, window_ms, hold_ms, dense_dim)
        parts.append(b)
        times.append(t)
        truth.append(y)
        first.append(f)
    order = np.argsort(np.concatenate(times), kind="stable")
    return _Stream(ExampleBatch.concat(parts).take(order),
                   np.concatenate(truth)[order].astype(np.float32), np.concatenate(first)[order],
                   np.concatenate(times)[order])


def _generator_requests(stream: SyntheticStream, block: Any) -> list[ClosedRequest]:
    reqs: dict[str, ClosedRequest] = {}
    for topic, value in stream.messages(block):
        obj = msgpack.unpackb(value, raw=False)
        if topic == "impressions":
            reqs[obj["request_id"]] = ClosedRequest(obj, [])
        else:
            for rid, item, t in zip(obj["request_id"], obj["item_id"], obj["event_time_ms"]):
                reqs[rid].actions.append(PendingAction(item, "click", 1.0, t, obj["user_id"][0]))
    return list(reqs.values())


def generator_source(world: GeneratorConfig, events: int, window_ms: int, hold_ms: int,
                     block_requests: int = 256) -> Source:
    """``events`` generated events (shown items + clicks) as each mode would emit them."""
    def source(emit: str) -> _Stream:
        stream = SyntheticStream(world)

        def blocks() -> Iterator[list[ClosedRequest]]:
            seen = 0
            while seen < events:
                block = stream.block(block_requests)
                seen += stream.count_events(block)
                yield _generator_requests(stream, block)
        return _collect(blocks(), emit, window_ms, hold_ms)
    return source


def log_source(encoded: Any, name: str, window_ms: int, hold_ms: int, max_delay_ms: int,
               seed: int = 0, block_rows: int = 8192) -> Source:
    """An encoded log (:func:`streams.log_reader.encode_log`) as each mode would emit it, every
    click delayed by a seeded uniform draw in [1, ``max_delay_ms``] after its impression."""
    from streams.log_reader import log_requests

    def source(emit: str) -> _Stream:
        rng = np.random.default_rng(seed)

        def blocks() -> Iterator[list[ClosedRequest]]:
            reqs: list[ClosedRequest] = []
            for imp, clicks in log_requests(encoded, name):
                delay = rng.integers(1, max(2, max_delay_ms + 1), len(clicks)).tolist()
                reqs.append(ClosedRequest(dict(vars(imp)), [
                    PendingAction(a.item_id, a.kind, a.value, imp.event_time_ms + d, a.user_id)
                    for a, d in zip(clicks, delay)]))
                if len(reqs) >= block_rows:
                    yield reqs
                    reqs = []
            if reqs:
                yield reqs
        return _collect(blocks(), emit, window_ms, hold_ms, int(encoded.dense.shape[1]))
    return source


def _serving(s: _Stream, times: np.ndarray, probes: ExampleBatch, probe_t: np.ndarray,
             cfg: Any, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Trains on ``s`` in emission order and scores each probe (an impression's item) at its
    event time with the model trained on the rows emitted before it. Returns the probabilities
    and which probes serving would have answered: once the learner has trained and is past its
    cold-start hold (the demo opens serving only then; before, the learner is the untrained
    model, p = 1/2 for the generator's first ~40k rows under a 1 s hold)."""
    from training.learner import Learner
    from training.model.inference import score

    learner: Learner | None = None
    done, q, open_ = 0, [], []
    for start in range(0, len(probes), chunk):
        idx = np.arange(start, min(len(probes), start + chunk))
        upto = int(np.searchsorted(times, probe_t[idx[0]], side="right"))
        for b in range(done, upto, cfg.batch_size):
            rows = s.batch.take(np.arange(b, min(upto, b + cfg.batch_size)))
            learner = learner or Learner.for_batch(cfg, rows)
            learner.train(rows)
        done = max(done, upto)
        part = probes.take(idx)
        serves = learner is not None and learner.examples_trained > 0 and not learner.cold_starting
        open_.append(np.full(len(idx), serves))
        if learner is None:
            q.append(np.full(len(idx), 0.5))
            continue
        q.append(score(learner.table, learner.tower, part.sparse, part.dense, len(idx)).numpy())
    return np.concatenate(q).astype(np.float64), np.concatenate(open_)


def _serving_metrics(p: np.ndarray, y: np.ndarray, served: np.ndarray) -> dict:
    """``serving_*`` over the probes ``served`` (every arm's serving open, second half)."""
    from training.prequential import metrics_of

    p = np.clip(p[served], 1e-7, 1 - 1e-7)
    y = y[served].astype(np.float32)
    if not len(y):
        return {"serving_auc": None, "serving_logloss": None, "serving_calibration": None, "serving_probes": 0}
    m = metrics_of(np.log(p) - np.log1p(-p), y, np.ones(len(y))).to_dict()
    return {"serving_auc": m["auc_overall"], "serving_logloss": m["logloss"],
            "serving_calibration": round(float(p.mean() / y.mean()), 4) if y.any() else None,
            "serving_probes": int(len(y))}


def _score(s: _Stream, cfg: Any) -> dict:
    """Trains a fresh learner on ``s`` in emission order, scoring each impression once, by the
    model as it stood when its row was trained (matched by example id: a row the cold-start
    hold keeps is trained, and scored, at its release)."""
    import torch

    from training.learner import Learner
    from training.prequential import metrics_of

    recorder = _Recorder(cfg.eval_window)
    learner: Learner | None = None
    ids: list[np.ndarray] = []
    spent = 0.0
    threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    try:
        for rows in _chunks(s.batch, cfg.batch_size):
            if learner is None:
                learner = Learner.for_batch(cfg, rows)
                learner.evaluator, learner.early_labels = recorder, None  # scored here, by id
            t = time.perf_counter()
            before = learner.examples_trained
            learner.train(rows)
            if learner.examples_trained > before:
                ids.append(learner.last_trained.example_id)
            spent += time.perf_counter() - t
        assert learner is not None
        t = time.perf_counter()
        if learner.flush():  # rows still held at the stream's end
            ids.append(learner.last_trained.example_id)
        spent += time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    trained_ids = np.concatenate(ids)
    trained_logits = np.concatenate(recorder.logits)
    if len(trained_ids) != len(trained_logits) or len(np.unique(trained_ids)) != len(trained_ids):
        raise RuntimeError("the learner scored a row twice, or a row it did not train")
    first_ids = s.batch.example_id[s.first]
    order = np.argsort(s.batch.event_time_ms[s.first], kind="stable")  # impression time
    sorter = np.argsort(trained_ids)
    at = sorter[np.searchsorted(trained_ids, first_ids[order], sorter=sorter)]
    if not np.array_equal(trained_ids[at], first_ids[order]):
        raise RuntimeError("an impression was never trained")
    logits = trained_logits[at]
    y = s.true_label[s.first][order]
    m = metrics_of(logits, y, np.ones(len(y))).to_dict()
    q = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    rate = float(y.mean())
    half = len(y) // 2
    late = metrics_of(logits[half:], y[half:], np.ones(len(y) - half)).to_dict()
    late_rate = float(y[half:].mean())
    tenths = [metrics_of(logits[a:b], y[a:b], np.ones(b - a)).to_dict()
              for a, b in zip(np.linspace(0, len(y), 11).astype(int)[:-1],
                              np.linspace(0, len(y), 11).astype(int)[1:])]
    stats = learner.cold_hold.summary() if learner.cold_hold is not None else learner.cold_hold_stats
    return {**m, "rows_trained": learner.examples_trained,
            "mean_prediction": round(float(q.mean()), 5), "positive_rate": round(rate, 5),
            "calibration": round(float(q.mean()) / rate, 4) if rate > 0 else None,
            "auc_after_warmup": late["auc_overall"], "logloss_after_warmup": late["logloss"],
            "calibration_after_warmup": (round(float(q[half:].mean()) / late_rate, 4)
                                         if late_rate > 0 else None),
            "auc_by_tenth": [t["auc_overall"] for t in tenths],
            "logloss_by_tenth": [t["logloss"] for t in tenths],
            "cold_start_hold": stats if stats and stats["held"] else None,
            "examples_per_s": round(learner.examples_trained / spent, 1) if spent > 0 else None}


class _Recorder:
    """The learner's evaluator in :func:`_score`: keeps the pre-update logits of each step."""

    def __init__(self, window: int) -> None:
        self.logits: list[np.ndarray] = []

    def update(self, logits: np.ndarray, *_rest: Any) -> None:
        self.logits.append(np.asarray(logits, np.float32).copy())


def _chunks(batch: ExampleBatch, size: int):
    for s in range(0, len(batch), size):
        yield batch.take(np.arange(s, min(len(batch), s + size)))


def run_arms(source: Source, cfg: Any, arms: tuple[str, ...], window_ms: int,
             serving: bool = True, progress: Callable[[str], None] = lambda _a: None) -> dict:
    """Each arm's figures on the same stream (``source``: :func:`generator_source` or
    :func:`log_source`), and early minus window deltas."""
    out: dict[str, Any] = {}
    streams: dict[str, _Stream] = {}
    served: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    labels = np.zeros(0, np.float32)
    for arm in arms:
        progress(arm)
        emit = "window" if arm == "window" else "early"
        if emit not in streams:
            streams[emit] = source(emit)
        correction = arm.split("_", 1)[1] if emit == "early" else cfg.early_correction
        arm_cfg = replace(cfg, early_correction=correction)
        out[arm] = {"correction": correction if emit == "early" else None, **_score(streams[emit], arm_cfg)}
        if serving:
            probes = streams.setdefault("window", streams.get("window") or source("window"))
            order = np.argsort(probes.times - window_ms, kind="stable")
            probe_batch = probes.batch.take(order)
            served[arm] = _serving(streams[emit], streams[emit].times, probe_batch,
                                   (probes.times - window_ms)[order], arm_cfg)
            labels = probes.true_label[order]  # final labels, impression time order
    if served:
        # Every arm on the same probes: the second half (a windowed model serves nothing for a
        # window), where every arm's serving is open.
        common = np.ones(len(labels), bool)
        common[: len(labels) // 2] = False
        for _, open_ in served.values():
            common &= open_
        for arm, (p, _) in served.items():
            out[arm].update(_serving_metrics(p, labels, common))
    if "window" in out:
        for arm in ARMS[1:]:
            if arm in out and out[arm]["auc_overall"] is not None:
                for k, name in (("auc_overall", "auc"), ("logloss", "logloss"),
                                ("auc_after_warmup", "auc_after_warmup"),
                                ("logloss_after_warmup", "logloss_after_warmup"),
                                ("serving_auc", "serving_auc"), ("serving_logloss", "serving_logloss")):
                    if out[arm].get(k) is not None and out["window"].get(k) is not None:
                        out[arm][f"{name}_delta_vs_window"] = round(out[arm][k] - out["window"][k], 4)
                out[arm]["auc_by_tenth_delta_vs_window"] = [
                    None if a is None or w is None else round(a - w, 4)
                    for a, w in zip(out[arm]["auc_by_tenth"], out["window"]["auc_by_tenth"])]
    return out
