"""The demo's monitor: samples every child's ``/metrics`` once a second into the summary's series."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from headwater.metrics import scrape
from serving.end_to_end import EndToEndFreshness, lag_from_metrics

if TYPE_CHECKING:
    from headwater.demo.load import LoadClient

__all__ = ["DemoMonitor"]


class DemoMonitor:
    """Samples the children's metrics once a second and keeps the series the summary needs.

    ``replay``: the events come from a log replay, which has no metrics endpoint (it is a short
    job); they are counted as the joiner consumes them instead.
    """

    def __init__(self, components: list, load: "LoadClient | None" = None,
                 replay: bool = False) -> None:
        self.load, self.replay = load, replay
        self.urls = {c.spec.name: f"http://127.0.0.1:{c.metrics_port}/metrics"
                     for c in components if c.metrics_port}
        self.history: list[dict[str, float]] = []
        self.end_to_end = EndToEndFreshness()
        # the same samples once the trainer is past its cold start (on an early stream a fresh
        # learner trains on final labels only, one label wait late, until it is warm)
        self.end_to_end_steady = EndToEndFreshness()
        self.cold_start_samples = 0

    def sample(self) -> dict[str, float]:
        s = {name: scrape(url, timeout_s=0.5) for name, url in self.urls.items()}
        row: dict[str, float] = {"t": time.monotonic()}
        joiner = _merged([v for k, v in s.items() if k == "joiner" or k.startswith("joiner-")])
        row["events"] = (_total(joiner, "hw_stream_events_in_total") if self.replay else
                         _total(s.get("generator", {}), "hw_stream_produced_events_total"))
        row["examples"] = _total(joiner, "hw_stream_examples_out_total")
        row["dlq"] = _total(joiner, "hw_stream_dlq_total")
        row["pending"] = (sum(v for _, v in joiner["hw_stream_pending_requests"])
                          if joiner.get("hw_stream_pending_requests") else math.nan)
        trainer = s.get("trainer", {})
        row["trained"] = _total(trainer, "hw_train_examples_total")
        # Generated events the trained examples came from: each example is one shown item, each
        # positive also one click, so events per example = 1 + the joined positive rate.
        positives = sum(v for lab, v in joiner.get("hw_stream_examples_out_total", [])
                        if lab.get("label") == "1") if joiner else math.nan
        row["events_trained"] = (row["trained"] * (1 + positives / row["examples"])
                                 if row["examples"] and not math.isnan(positives) else 0.0)
        row["auc_window"] = _value(trainer, "hw_train_auc", {"scope": "window", "model": "learner"})
        row["auc_truth"] = _value(trainer, "hw_train_auc", {"scope": "window", "model": "truth"})
        row["logloss_window"] = _value(trainer, "hw_train_logloss",
                                       {"scope": "window", "model": "learner"})
        row["auc_overall"] = _value(trainer, "hw_train_auc", {"scope": "overall", "model": "learner"})
        row["logloss_overall"] = _value(trainer, "hw_train_logloss",
                                        {"scope": "overall", "model": "learner"})
        serving = s.get("serving", {})
        row["model_version"] = _value(serving, "hw_serve_model_version", {})
        # How far serving's parameters trail the trainer's, in event time (= wall time here):
        # newest example trained minus newest example whose update serving has applied.
        trained_wm = _value(trainer, "hw_train_watermark_ms", {})
        row["trained_lag_s"] = (time.time() - trained_wm / 1000) if trained_wm > 0 else math.nan
        serve_lag_s = _value(serving, "hw_serve_freshness_lag_seconds", {})
        row["freshness_ms"] = (trained_wm - (time.time() * 1000 - serve_lag_s * 1000)
                               if trained_wm > 0 and serve_lag_s >= 0 and not self.replay else math.nan)
        # A replay's event time is the log's (years ago, running faster than the clock): "now
        # minus event time" is no freshness there, so both figures are left out (None).
        row["end_to_end_s"] = math.nan if self.replay else lag_from_metrics(serving)
        self.end_to_end.add(row["end_to_end_s"])
        row["cold_start"] = _value(trainer, "hw_train_cold_start", {})
        if row["cold_start"] == 1.0:
            self.cold_start_samples += 1
        elif row["trained"] > 0 and self.history and self.history[-1].get("cold_start") == 0.0:
            # warm in this sample and the one before: serving trails the trainer by a sync
            self.end_to_end_steady.add(row["end_to_end_s"])
        row["serving_p99_ms"] = self.load.p99_ms() if self.load else math.nan
        self.history.append(row)
        return row

    def rate(self, key: str, window_s: float = 5.0) -> float:
        """Per-second rate of a counter over the last ``window_s`` seconds."""
        if len(self.history) < 2:
            return 0.0
        last = self.history[-1]
        first = next((r for r in self.history if last["t"] - r["t"] <= window_s), self.history[0])
        dt = last["t"] - first["t"]
        return (last[key] - first[key]) / dt if dt > 0 else 0.0

    def summary(self) -> dict[str, float | int | None]:
        aucs = [(r["auc_window"], r["auc_truth"]) for r in self.history
                if not math.isnan(r["auc_window"])]
        last = self.history[-1] if self.history else {}
        auc_last, auc_truth = aucs[-1] if aucs else (math.nan, math.nan)
        return {
            "events": int(last.get("events", 0)),
            "examples": int(last.get("examples", 0)),
            "trained": int(last.get("trained", 0)),
            "dlq": int(last.get("dlq", 0)),
            "events_trained": int(last.get("events_trained", 0)),
            "auc_first_window": aucs[0][0] if aucs else None,
            "auc_last_window": _none_if_nan(auc_last),
            "auc_truth_last_window": _none_if_nan(auc_truth),
            "auc_gap": _none_if_nan(auc_truth - auc_last),
            "freshness_p99_ms": _p99([r["freshness_ms"] for r in self.history]),
            **self.end_to_end.quantiles(),
            **{k.replace("end_to_end", "end_to_end_steady"): v
               for k, v in self.end_to_end_steady.quantiles().items()},
            "cold_start_s": self.cold_start_samples,  # once-a-second samples in the cold start
            "serving_p99_ms": self.load.p99_ms(all_calls=True) if self.load else None,
            "serving_calls": self.load.calls if self.load else 0,
            "serving_errors": self.load.errors if self.load else 0,
            "model_version": _none_if_nan(last.get("model_version", math.nan)),
            # the LLM's load is the rerank of the load's calls: answered, and degraded by an error
            "llm_calls": self.load.reranked if self.load else 0,
            "llm_errors": self.load.rerank_reasons.get("llm_error", 0) if self.load else 0,
            "rerank_asked": self.load.rerank_asked if self.load else 0,
            "rerank_degraded": dict(self.load.rerank_reasons) if self.load else {},
            # calls without candidates, by the stage that retrieved them (demo --two-tower)
            "retrieval_sources": dict(self.load.retrieval_sources) if self.load else {},
        }


def _merged(scrapes: list[dict]) -> dict:
    """Several replicas' samples as one scrape (``demo --joiners N``): sums read across them."""
    out: dict[str, list] = {}
    for samples in scrapes:
        for name, values in samples.items():
            out.setdefault(name, []).extend(values)
    return out


def _total(samples: dict, name: str) -> float:
    return sum(v for _labels, v in samples.get(name, []))


def _value(samples: dict, name: str, labels: dict[str, str]) -> float:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == val for k, val in labels.items()):
            return v
    return math.nan


def _p99(values: list[float]) -> float | None:
    vals = sorted(v for v in values if not math.isnan(v))
    return vals[min(len(vals) - 1, int(0.99 * len(vals)))] if vals else None


def _none_if_nan(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x
