"""End-to-end freshness: how old, in event time, is the newest click that serving has learned from.

One figure, one place: a sample is *now minus the event time of the newest example whose update
serving has applied* (serving's ``hw_serve_freshness_lag_seconds`` gauge, or the ``watermark_ms``
of the newest ``hw.params`` message applied), taken once a second; ``end_to_end_p50_s`` and
``end_to_end_p99_s`` are quantiles over the recent samples. It covers the whole path (join hold or
window, examples topic, training, publish interval, params topic, apply), where
``freshness_p99_ms`` covers only trainer -> serving. ``headwater demo --json`` and ``headwater
bench freshness`` report it; the serving process samples it itself and exports the two quantiles
as ``hw_serve_end_to_end_seconds{quantile="0.5"|"0.99"}`` (last 10 minutes), which the dashboard
charts beside the per-second sample.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

__all__ = ["EndToEndFreshness", "lag_from_metrics", "lag_s"]

LAG_METRIC = "hw_serve_freshness_lag_seconds"


def lag_s(watermark_ms: int, now_ms: float | None = None) -> float:
    """Now minus ``watermark_ms`` (the event time of the newest applied example), in seconds;
    NaN before any update (a negative watermark)."""
    if watermark_ms < 0:
        return math.nan
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    return max(now_ms - watermark_ms, 0.0) / 1000.0


def lag_from_metrics(samples: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    """The sample from a scrape of serving's ``/metrics`` (the worst lag where several serve);
    NaN when serving has applied nothing yet."""
    values = [v for _labels, v in samples.get(LAG_METRIC, []) if v >= 0]
    return max(values) if values else math.nan


class EndToEndFreshness:
    """The last ``horizon`` once-a-second samples, and their p50 / p99."""

    def __init__(self, horizon: int = 3600) -> None:
        self.samples: deque[float] = deque(maxlen=horizon)

    def add(self, lag: float) -> None:
        """One sample in seconds (NaN: nothing applied yet, not recorded)."""
        if not math.isnan(lag):
            self.samples.append(float(lag))

    def quantiles(self) -> dict[str, float | None]:
        """``end_to_end_p50_s`` and ``end_to_end_p99_s`` (None before any sample)."""
        if not self.samples:
            return {"end_to_end_p50_s": None, "end_to_end_p99_s": None}
        arr = np.fromiter(self.samples, np.float64, len(self.samples))
        p50, p99 = np.percentile(arr, [50, 99])
        return {"end_to_end_p50_s": round(float(p50), 3), "end_to_end_p99_s": round(float(p99), 3)}
