"""``headwater bench learning --emit early|both``: early emission + correction against the windowed
join, on the generator (truth known), in one run.

The same generated impressions and clicks go through the joiner's own emission logic
(:func:`~streams.join_build.build_examples` for ``window``, :func:`~streams.join_build.build_early`
for ``early``), and the rows reach a fresh learner in the order the joiner would emit them: a
windowed example at its request's window close, an early negative at the hold, a positive copy
at its click (or at the hold, for a click within it). Arms: ``window``, ``early_fnw`` (the
trainer's default correction) and ``early_none`` (no correction).

Every arm is scored twice on the true label, each impression's item once:

- ``auc_overall``, ``logloss``, ``calibration``: prequentially, by the model as it stood when the
  item first reached the trainer (early arms: its negative's pre-update score; the positive copy
  is not scored again). This favours the window: it scores at window close, with every click of
  the window before it already learned.
- ``serving_auc``, ``serving_logloss``, ``serving_calibration``: at the impression's own event
  time, by the model trained on what had been emitted by then (serving's view, publish delay
  left out), over the second half of the stream (the first is warm-up): the freshness the
  window costs counts here.

``calibration`` = mean predicted probability / positive rate on those rows (1 = calibrated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import msgpack
import numpy as np

from streams.events import ExampleBatch
from streams.generator import GeneratorConfig, SyntheticStream
from streams.join_build import ClosedRequest, build_early, build_examples
from streams.join_state import PendingAction

__all__ = ["ARMS", "run_arms"]

ARMS = ("window", "early_fnw", "early_none")
_POSITIVE = frozenset({"click"})


@dataclass
class _Stream:
    """Rows in emission order, with each row's true label and whether it is its item's first."""

    batch: ExampleBatch
    true_label: np.ndarray
    first: np.ndarray
    times: np.ndarray  # emission event time of each row (ms)


def _requests(stream: SyntheticStream, block: Any) -> list[ClosedRequest]:
    reqs: dict[str, ClosedRequest] = {}
    for topic, value in stream.messages(block):
        obj = msgpack.unpackb(value, raw=False)
        if topic == "impressions":
            reqs[obj["request_id"]] = ClosedRequest(obj, [])
        else:
            for rid, item, t in zip(obj["request_id"], obj["item_id"], obj["event_time_ms"]):
                reqs[rid].actions.append(PendingAction(item, "click", 1.0, t, obj["user_id"][0]))
    return list(reqs.values())


def emitted(world: GeneratorConfig, events: int, emit: str, window_ms: int, hold_ms: int,
            block_requests: int = 256) -> _Stream:
    """``events`` generated events as the joiner in mode ``emit`` would send them."""
    stream = SyntheticStream(world)
    parts, times, truth, first = [], [], [], []
    seen = 0
    while seen < events:
        block = stream.block(block_requests)
        seen += stream.count_events(block)
        reqs = _requests(stream, block)
        k = block.items.shape[1]
        t_imp = np.repeat(block.event_time_ms, k)
        delay = (block.click_time_ms - block.event_time_ms[:, None]).reshape(-1)
        label = block.clicked.reshape(-1) & (delay <= window_ms)
        if emit == "window":
            batch, _, _ = build_examples(reqs, window_ms, _POSITIVE, 1.0, 0)
            parts.append(batch)
            times.append(t_imp + window_ms)
            truth.append(label)
            first.append(np.ones(len(batch), bool))
            continue
        batch, _, _ = build_early(reqs, window_ms, _POSITIVE, 1.0, 0)  # n negatives, then copies
        n = len(label)
        click_at = block.click_time_ms.reshape(-1)[label]
        parts.append(batch)
        times.append(np.concatenate([t_imp + hold_ms, np.maximum(click_at, t_imp[label] + hold_ms)]))
        truth.append(np.concatenate([label, np.ones(int(label.sum()), bool)]))
        first.append(np.concatenate([np.ones(n, bool), np.zeros(int(label.sum()), bool)]))
    order = np.argsort(np.concatenate(times), kind="stable")
    return _Stream(ExampleBatch.concat(parts).take(order),
                   np.concatenate(truth)[order].astype(np.float32), np.concatenate(first)[order],
                   np.concatenate(times)[order])


def _serving(s: _Stream, times: np.ndarray, probes: ExampleBatch, probe_t: np.ndarray,
             cfg: Any, chunk: int = 1024) -> dict:
    """Trains on ``s`` in emission order and scores each probe (an impression's item) at its
    event time with the model trained on the rows emitted before it."""
    from training.learner import Learner
    from training.model.inference import score
    from training.prequential import metrics_of

    learner: Learner | None = None
    done, q = 0, []
    for start in range(0, len(probes), chunk):
        idx = np.arange(start, min(len(probes), start + chunk))
        upto = int(np.searchsorted(times, probe_t[idx[0]], side="right"))
        for b in range(done, upto, cfg.batch_size):
            rows = s.batch.take(np.arange(b, min(upto, b + cfg.batch_size)))
            learner = learner or Learner.for_batch(cfg, rows)
            learner.train(rows)
        done = max(done, upto)
        part = probes.take(idx)
        if learner is None:
            q.append(np.full(len(idx), 0.5))
            continue
        q.append(score(learner.table, learner.tower, part.sparse, part.dense, len(idx)).numpy())
    half = len(probes) // 2  # after warm-up: a windowed model serves nothing for a window
    p = np.clip(np.concatenate(q)[half:].astype(np.float64), 1e-7, 1 - 1e-7)
    y = probes.label[half:].astype(np.float32)
    m = metrics_of(np.log(p) - np.log1p(-p), y, np.ones(len(y))).to_dict()
    return {"serving_auc": m["auc_overall"], "serving_logloss": m["logloss"],
            "serving_calibration": round(float(p.mean() / y.mean()), 4) if y.any() else None}


def _score(s: _Stream, cfg: Any) -> dict:
    from training.prequential import metrics_of, run_stream

    res = run_stream(_chunks(s.batch, 4096), cfg)
    logits = np.concatenate(res.evaluator.logits)[s.first]
    y = s.true_label[s.first]
    m = metrics_of(logits, y, np.ones(len(y))).to_dict()
    q = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    rate = float(y.mean())
    return {**m, "rows_trained": res.examples, "mean_prediction": round(float(q.mean()), 5),
            "positive_rate": round(rate, 5),
            "calibration": round(float(q.mean()) / rate, 4) if rate > 0 else None,
            "examples_per_s": round(res.examples_per_s, 1)}


def _chunks(batch: ExampleBatch, size: int):
    for s in range(0, len(batch), size):
        yield batch.take(np.arange(s, min(len(batch), s + size)))


def run_arms(world: GeneratorConfig, cfg: Any, events: int, arms: tuple[str, ...],
             window_ms: int, hold_ms: int, serving: bool = True, progress: Callable[[str], None] = lambda _a: None) -> dict:
    """Each arm's figures on the same generated stream, and early minus window deltas."""
    out: dict[str, Any] = {}
    streams: dict[str, _Stream] = {}
    for arm in arms:
        progress(arm)
        emit = "window" if arm == "window" else "early"
        if emit not in streams:
            streams[emit] = emitted(world, events, emit, window_ms, hold_ms)
        correction = "none" if arm == "early_none" else "fnw"
        arm_cfg = replace(cfg, early_correction=correction)
        out[arm] = _score(streams[emit], arm_cfg)
        if serving:
            probes = streams["window"] if "window" in streams else emitted(
                world, events, "window", window_ms, hold_ms)
            streams.setdefault("window", probes)
            probe_batch = probes.batch.take(np.argsort(probes.times - window_ms, kind="stable"))
            probe_batch.label = probes.true_label  # the window's rows: final labels, time order
            out[arm].update(_serving(streams[emit], streams[emit].times, probe_batch,
                                     np.sort(probes.times - window_ms), arm_cfg))
    if "window" in out:
        for arm in ("early_fnw", "early_none"):
            if arm in out and out[arm]["auc_overall"] is not None:
                out[arm]["auc_delta_vs_window"] = round(out[arm]["auc_overall"] - out["window"]["auc_overall"], 4)
                out[arm]["logloss_delta_vs_window"] = round(out[arm]["logloss"] - out["window"]["logloss"], 4)
    return out
