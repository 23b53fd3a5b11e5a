"""Polls the components' ``/metrics`` pages and keeps a bounded history of the dashboard's series.

Each tick reads every source with ``prometheus_client.parser``, merges the samples (a metric is
found by name wherever it lives, so two joiners add up), and derives one value per series:
gauges as read, counters as per-second rates over a short trailing window, and latency
quantiles from the histogram buckets' increase over that window (the quantile of recent calls,
not of everything since the process started). A series with no source yet records nothing, so
the page can tell "absent" from "zero".
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

__all__ = ["SERIES", "MetricsScraper", "SeriesSpec", "bucket_quantile", "parse_sources", "read_metrics"]

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class SeriesSpec:
    """One plotted line: which sample it reads, how, and where the page draws it.

    ``kind`` is ``gauge`` (value as read, first non-zero matching sample), ``rate`` (per-second increase of
    the summed counter samples), ``quantile`` (``q`` of the histogram named ``metric`` over the
    rate window, in ``scale`` units), ``diff`` (``metric`` minus ``minus``, both gauges), ``age``
    (wall seconds since the gauge last changed value) or ``behind`` (the event time in ms of
    ``metric`` minus the event time that ``minus``, a "now minus watermark" lag in seconds, implies
    at the scrape, in seconds)."""

    name: str
    metric: str
    kind: str
    chart: str
    label: str
    labels: dict[str, str] = field(default_factory=dict)
    q: float = 0.0
    scale: float = 1.0
    minus: str = ""


# The charts and their lines, named after the metrics the components define:
# training/evaluation.py, streams/metrics.py, training/trainer.py, training/publish_guard.py,
# serving/metrics.py and the LLM HTTP server's serving/http/metrics.py.
SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("auc_learner", "hw_train_auc", "gauge", "auc", "learner",
               {"model": "learner", "scope": "window"}),
    SeriesSpec("auc_truth", "hw_train_auc", "gauge", "auc", "ground truth",
               {"model": "truth", "scope": "window"}),
    SeriesSpec("logloss_learner", "hw_train_logloss", "gauge", "logloss", "learner",
               {"model": "learner", "scope": "window"}),
    SeriesSpec("logloss_truth", "hw_train_logloss", "gauge", "logloss", "ground truth",
               {"model": "truth", "scope": "window"}),
    SeriesSpec("events_per_s", "hw_stream_produced_events_total", "rate", "throughput", "events/s"),
    SeriesSpec("examples_per_s", "hw_stream_examples_out_total", "rate", "throughput", "examples/s"),
    SeriesSpec("trained_per_s", "hw_train_examples_total", "rate", "throughput", "trained/s"),
    # Freshness. "Serving behind trainer" is the demo summary's freshness: the newest example
    # trained minus the newest example whose update serving applied (event time follows the wall
    # clock there). The other two hold whatever the event-time clock is.
    SeriesSpec("serving_behind_trainer_s", "hw_train_watermark_ms", "behind", "freshness",
               "serving behind trainer", minus="hw_serve_freshness_lag_seconds"),
    SeriesSpec("replica_age_s", "hw_serve_model_version", "age", "freshness",
               "since serving's last new version"),
    SeriesSpec("publish_lag_s", "hw_stream_watermark_ms", "diff", "freshness",
               "joiner watermark - published watermark", minus="hw_train_published_watermark_ms",
               scale=0.001),
    SeriesSpec("serve_event_lag_s", "hw_serve_freshness_lag_seconds", "gauge", "event_lag",
               "now - event time of newest applied update"),
    SeriesSpec("end_to_end_p50_s", "hw_serve_end_to_end_seconds", "gauge", "event_lag",
               "p50 over 10 min", labels={"quantile": "0.5"}),
    SeriesSpec("end_to_end_p99_s", "hw_serve_end_to_end_seconds", "gauge", "event_lag",
               "p99 over 10 min", labels={"quantile": "0.99"}),
    SeriesSpec("model_version", "hw_serve_model_version", "gauge", "version", "served"),
    SeriesSpec("published_version", "hw_train_published_version", "gauge", "version", "published"),
    SeriesSpec("serve_p50_ms", "hw_serve_latency_seconds", "quantile", "latency", "p50 (ms)",
               q=0.5, scale=1000.0),
    SeriesSpec("serve_p99_ms", "hw_serve_latency_seconds", "quantile", "latency", "p99 (ms)",
               q=0.99, scale=1000.0),
    SeriesSpec("serve_rps", "hw_serve_requests_total", "rate", "rps", "calls/s"),
    # The publish guard (training/publish_guard.py): held-back updates, the hold, rollbacks.
    SeriesSpec("guard_failures_per_min", "hw_train_guard_failures_total", "rate", "guard",
               "updates held back /min", scale=60.0),
    SeriesSpec("guard_holding", "hw_train_guard_holding", "gauge", "guard", "holding (1 = nothing published)"),
    SeriesSpec("guard_rollbacks", "hw_train_guard_rollbacks_total", "gauge", "guard", "rollbacks (total)"),
    SeriesSpec("rejected_examples_per_s", "hw_train_rejected_examples_total", "rate", "guard",
               "bad examples refused /s"),
    SeriesSpec("llm_tokens_per_s", "hw_llm_output_tokens_total", "rate", "llm_tokens", "output tokens/s"),
    SeriesSpec("llm_prompt_tokens_per_s", "hw_llm_prompt_tokens_total", "rate", "llm_tokens",
               "prompt tokens/s"),
    SeriesSpec("llm_kv_usage_pct", "hw_llm_kv_usage", "gauge", "llm_kv", "KV blocks used (%)",
               scale=100.0),
    SeriesSpec("llm_running", "hw_llm_running", "gauge", "llm_kv", "running requests"),
    # The LLM rerank stage of Recommend (serving/rerank.py; `headwater serve --llm`).
    SeriesSpec("rerank_per_s", "hw_serve_rerank_calls_total", "rate", "rerank", "reranked calls/s"),
    SeriesSpec("rerank_degraded_per_s", "hw_serve_rerank_degraded_total", "rate", "rerank",
               "degraded calls/s (DLRM order)"),
    SeriesSpec("rerank_prefix_hit_pct", "hw_serve_rerank_prefix_hit_rate", "gauge", "rerank_llm",
               "prefix-cache hit (%)", scale=100.0),
    SeriesSpec("rerank_llm_p50_ms", "hw_serve_rerank_seconds", "quantile", "rerank_llm",
               "LLM ms per rerank, p50", q=0.5, scale=1000.0),
    SeriesSpec("rerank_weight_pct", "hw_serve_rerank_tuned_weight", "gauge", "rerank_llm",
               "LLM weight in the blend (%, tuned online)", scale=100.0),
)


def parse_sources(text: str) -> dict[str, str]:
    """``name=url,name=url`` -> {name: url}; a bare ``host:port`` gets ``http://`` and ``/metrics``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, url = part.partition("=")
        if not sep or not name or not url:
            raise ValueError(f"source {part!r} is not name=url")
        if name in out:
            raise ValueError(f"source name {name!r} given twice")
        if "://" not in url:
            url = f"http://{url}"
        if url.count("/") == 2:  # scheme://host:port with no path
            url += "/metrics"
        out[name] = url
    return out


def read_metrics(url: str, timeout_s: float) -> Samples | None:
    """One ``/metrics`` page as sample name -> [(labels, value)]; None when unreachable or garbled."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return samples
    except (urllib.error.URLError, OSError, ValueError, UnicodeDecodeError) as exc:
        log.debug("scrape of %s failed: %s", url, exc)
        return None


def _matching(samples: Samples, name: str, labels: dict[str, str]) -> list[float]:
    return [v for lab, v in samples.get(name, ()) if all(lab.get(k) == w for k, w in labels.items())]


def _first_set(vals: list[float]) -> float:
    """The first non-zero gauge value: processes that import a metrics module they do not use
    export its gauges at 0, and must not hide the process that sets them."""
    return next((v for v in vals if v != 0.0), vals[0])


def _buckets(samples: Samples, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Cumulative bucket counts of a histogram summed over its other labels: (upper bounds, counts)."""
    rows = samples.get(f"{metric}_bucket")
    if not rows:
        return None
    acc: dict[float, float] = {}
    for lab, v in rows:
        le = float(lab.get("le", "nan"))
        acc[le] = acc.get(le, 0.0) + v
    bounds = np.array(sorted(acc), np.float64)
    return bounds, np.array([acc[b] for b in bounds], np.float64)


def bucket_quantile(bounds: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Prometheus-style quantile of cumulative ``counts`` (linear inside the bucket); nan if empty."""
    total = counts[-1] if len(counts) else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    i = int(np.searchsorted(counts, rank, side="left"))
    i = min(i, len(bounds) - 1)
    if math.isinf(bounds[i]):  # beyond the last finite bucket: report its bound
        return float(bounds[i - 1]) if i > 0 else math.nan
    lo_b = bounds[i - 1] if i > 0 else 0.0
    lo_c = counts[i - 1] if i > 0 else 0.0
    width = counts[i] - lo_c
    return float(lo_b + (bounds[i] - lo_b) * ((rank - lo_c) / width if width > 0 else 1.0))


@dataclass
class _Snapshot:
    t: float
    samples: Samples
    wall: float = 0.0  # time.time() of the scrape: "now" for lags the components export


class MetricsScraper:
    """Polls ``sources`` every ``interval_s`` on a daemon thread; :meth:`series` reads the history.

    History is bounded (``history_s`` of ticks); rates and latency quantiles look back
    ``rate_window_s``. ``t`` values are seconds since the scraper started."""

    def __init__(self, sources: dict[str, str], interval_s: float = 1.0, history_s: float = 900.0,
                 rate_window_s: float = 5.0, timeout_s: float = 0.5,
                 specs: tuple[SeriesSpec, ...] = SERIES) -> None:
        if interval_s <= 0 or history_s <= 0 or rate_window_s <= 0:
            raise ValueError("interval_s, history_s and rate_window_s must be positive")
        self.sources = dict(sources)
        self.interval_s, self.rate_window_s, self.timeout_s = interval_s, rate_window_s, timeout_s
        self.specs = specs
        maxlen = max(2, int(math.ceil(history_s / interval_s)))
        self._points: dict[str, deque[tuple[float, float]]] = {s.name: deque(maxlen=maxlen) for s in specs}
        self._recent: deque[_Snapshot] = deque(maxlen=max(2, int(math.ceil(rate_window_s / interval_s)) + 2))
        self._up: dict[str, bool] = {name: False for name in self.sources}
        self._changed: dict[str, tuple[float, float]] = {}  # age series: (last value, when it changed)
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(16, len(self.sources))),
                                        thread_name_prefix="dashboard-scrape")
        self.ticks = 0

    def start(self) -> MetricsScraper:
        self._thread = threading.Thread(target=self._run, name="dashboard-scraper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # a bad page must not kill the dashboard
                log.exception("dashboard scrape failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def tick(self) -> None:
        """Scrapes every source once and appends one point to each series that has data."""
        merged: Samples = {}
        up: dict[str, bool] = {}
        # In parallel: one slow or dead source costs one timeout per tick, not one per source.
        pages = list(self._pool.map(lambda url: read_metrics(url, self.timeout_s), self.sources.values()))
        for name, got in zip(self.sources, pages):
            up[name] = got is not None
            for key, rows in (got or {}).items():
                merged.setdefault(key, []).extend(rows)
        now = round(time.monotonic() - self._t0, 3)  # as served: ``since`` compares equal
        snap = _Snapshot(now, merged, time.time())
        with self._lock:
            self._up = up
            self._recent.append(snap)
            base = self._base(now)
            for spec in self.specs:
                value = self._derive(spec, snap, base)
                if value is not None and math.isfinite(value):
                    self._points[spec.name].append((now, value))
            self.ticks += 1

    def _base(self, now: float) -> _Snapshot | None:
        """The oldest recent snapshot inside the rate window (other than the newest)."""
        older = [s for s in list(self._recent)[:-1] if now - s.t <= self.rate_window_s + 1e-6]
        return older[0] if older else None

    def _derive(self, spec: SeriesSpec, snap: _Snapshot, base: _Snapshot | None) -> float | None:
        if spec.kind == "gauge":
            vals = _matching(snap.samples, spec.metric, spec.labels)
            return _first_set(vals) * spec.scale if vals else None
        if spec.kind == "diff":
            # Watermarks: the newest of each (a process that imports a metrics module without
            # using it exports the gauge at 0, e.g. the trainer's copy of the joiner's).
            a = max(_matching(snap.samples, spec.metric, spec.labels), default=0.0)
            b = max(_matching(snap.samples, spec.minus, spec.labels), default=0.0)
            if a <= 0 or b <= 0:  # 0 or -1: no watermark yet
                return None
            return (a - b) * spec.scale
        if spec.kind == "behind":
            wm = max(_matching(snap.samples, spec.metric, spec.labels), default=0.0)
            # Every headwater process exports serving's lag gauge (at 0 where it does not serve:
            # the trainer's comes first), so the lag is the one a process set, not the first.
            lag = _first_set(_matching(snap.samples, spec.minus, spec.labels) or [0.0])
            if wm <= 0 or lag <= 0:  # nothing trained or nothing applied yet
                return None
            # Scrapes of the two processes are a few ms apart: a tiny negative is measurement noise.
            return max(0.0, wm / 1000.0 - (snap.wall - lag)) * spec.scale
        if spec.kind == "age":
            vals = _matching(snap.samples, spec.metric, spec.labels)
            if not vals:
                return None
            value = _first_set(vals)  # serving's version, not another process's idle copy at 0
            last = self._changed.get(spec.name)
            if last is None or last[0] != value:
                self._changed[spec.name] = last = (value, snap.t)
            return (snap.t - last[1]) * spec.scale
        if spec.kind == "rate":
            cur = _matching(snap.samples, spec.metric, spec.labels)
            if not cur or base is None:
                return None
            prev = _matching(base.samples, spec.metric, spec.labels)
            delta = sum(cur) - sum(prev)
            if delta < 0:  # a source restarted and its counters began again
                delta = sum(cur)
            return delta / (snap.t - base.t) * spec.scale
        if spec.kind == "quantile":
            cur = _buckets(snap.samples, spec.metric)
            if cur is None:
                return None
            prev = _buckets(base.samples, spec.metric) if base is not None else None
            bounds, counts = cur
            if prev is not None and np.array_equal(prev[0], bounds) and (counts >= prev[1]).all():
                counts = counts - prev[1]
            return bucket_quantile(bounds, counts, spec.q) * spec.scale
        raise ValueError(f"unknown series kind {spec.kind!r}")

    def series(self, since: float = -1.0) -> dict:
        """JSON-ready: every series' points after ``since``, the charts they belong to, source status."""
        with self._lock:
            out = {}
            for spec in self.specs:
                pts = [p for p in self._points[spec.name] if p[0] > since]
                out[spec.name] = {"chart": spec.chart, "label": spec.label,
                                  "t": [p[0] for p in pts], "v": [p[1] for p in pts]}
            return {"now": round(time.monotonic() - self._t0, 3), "interval_s": self.interval_s,
                    "sources": [{"name": n, "url": self.sources[n], "up": self._up.get(n, False)}
                                for n in self.sources],
                    "series": out}
