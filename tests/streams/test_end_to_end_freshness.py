"""The end-to-end freshness figure: now minus the event time serving's newest update came from."""

import math

from serving.end_to_end import EndToEndFreshness, lag_from_metrics, lag_s


def test_lag_is_now_minus_the_applied_event_time():
    assert lag_s(1_000_000, now_ms=1_002_500) == 2.5
    assert math.isnan(lag_s(-1, now_ms=5))  # nothing applied yet


def test_quantiles_over_the_per_second_samples():
    fresh = EndToEndFreshness()
    for event_ms, now_ms in ((0, 1000), (1000, 2000), (2000, 3000), (3000, 13_000)):
        fresh.add(lag_s(event_ms, now_ms))
    fresh.add(math.nan)  # a second before serving applied anything: not a sample
    got = fresh.quantiles()
    assert got["end_to_end_p50_s"] == 1.0
    assert 9.0 < got["end_to_end_p99_s"] <= 10.0


def test_read_from_servings_metrics_and_none_before_any_sample():
    assert lag_from_metrics({"hw_serve_freshness_lag_seconds": [({}, 2.25)]}) == 2.25
    assert math.isnan(lag_from_metrics({}))
    assert EndToEndFreshness().quantiles() == {"end_to_end_p50_s": None, "end_to_end_p99_s": None}
