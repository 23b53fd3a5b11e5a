"""The scraper reads real /metrics pages over loopback and turns them into the dashboard's series."""

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from serving.dashboard import MetricsScraper, bucket_quantile, parse_sources
from streams.broker import free_port


@pytest.fixture
def endpoint():
    """A real Prometheus endpoint with metrics named like the components' (own registry)."""
    reg = CollectorRegistry()
    m = {
        "events": Counter("hw_stream_produced_events", "x", ["source"], registry=reg),
        "auc": Gauge("hw_train_auc", "x", ["model", "scope"], registry=reg),
        "lat": Histogram("hw_serve_latency_seconds", "x", ["method"], registry=reg,
                         buckets=(0.001, 0.002, 0.005, 0.01, 0.05)),
    }
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    yield f"http://127.0.0.1:{port}/metrics", m
    server.shutdown()
    thread.join()


def test_sources_parse_from_name_url_pairs_and_bad_lists_are_refused():
    assert parse_sources("joiner=127.0.0.1:9101, trainer=http://h:9/metrics") == {
        "joiner": "http://127.0.0.1:9101/metrics", "trainer": "http://h:9/metrics"}
    assert parse_sources("") == {}
    for bad in ("joiner", "=http://x", "a=x:1,a=y:2"):
        with pytest.raises(ValueError):
            parse_sources(bad)


def test_bucket_quantile_interpolates_inside_the_bucket_like_prometheus():
    bounds = np.array([1.0, 2.0, 4.0, np.inf])
    counts = np.array([10.0, 30.0, 40.0, 40.0])  # cumulative
    assert bucket_quantile(bounds, counts, 0.5) == pytest.approx(1.5)  # rank 20: half-way in (1, 2]
    assert bucket_quantile(bounds, counts, 0.25) == pytest.approx(1.0)
    assert bucket_quantile(bounds, counts, 0.875) == pytest.approx(3.0)
    assert np.isnan(bucket_quantile(bounds, np.zeros(4), 0.5))
    # Everything beyond the last finite bound: the bound is the best the buckets can say.
    assert bucket_quantile(bounds, np.array([0.0, 0.0, 0.0, 5.0]), 0.99) == 4.0


def test_gauges_rates_and_windowed_quantiles_come_from_the_scraped_page(endpoint):
    url, m = endpoint
    scraper = MetricsScraper({"trainer": url, "gone": f"http://127.0.0.1:{free_port()}/metrics"},
                             interval_s=1.0, rate_window_s=5.0)
    first = scraper.series()["series"]
    assert all(not s["v"] for s in first.values())  # nothing scraped yet: every series empty

    m["auc"].labels("learner", "window").set(0.71)
    m["auc"].labels("truth", "window").set(0.80)
    m["auc"].labels("learner", "overall").set(0.60)
    for _ in range(100):
        m["lat"].labels("Recommend").observe(0.04)  # old, slow calls
    scraper.tick()
    scraper._recent[-1].t -= 2.0  # as if the first scrape were 2 s ago (no sleeping in tests)
    m["events"].labels("generator").inc(3000)
    for _ in range(100):
        m["lat"].labels("Recommend").observe(0.0015)  # recent, fast calls
    scraper.tick()

    out = scraper.series()
    s = out["series"]
    assert s["auc_learner"]["v"] == [0.71, 0.71] and s["auc_truth"]["v"][-1] == 0.80
    assert s["auc_learner"]["chart"] == "auc"
    assert s["events_per_s"]["v"] == [pytest.approx(1500, rel=0.05)]  # 3000 events in ~2 s
    # The window quantile sees only the 100 recent calls (1-2 ms), not the slow ones before.
    assert 1.0 < s["serve_p99_ms"]["v"][-1] <= 2.0
    assert s["serve_p99_ms"]["v"][0] > 10.0  # the first tick had only the slow calls
    assert s["llm_tokens_per_s"]["v"] == []  # no LLM server among the sources: absent, not zero
    assert {x["name"]: x["up"] for x in out["sources"]} == {"trainer": True, "gone": False}
    assert scraper.series(since=s["auc_learner"]["t"][-1])["series"]["auc_learner"]["v"] == []


def test_a_restarted_source_does_not_produce_a_negative_rate(endpoint):
    url, m = endpoint
    scraper = MetricsScraper({"generator": url})
    m["events"].labels("generator").inc(5000)
    scraper.tick()
    scraper._recent[-1].t -= 1.0
    # The process restarted: its counter starts again from a smaller value.
    m["events"].labels("generator")._value.set(200)
    scraper.tick()
    rate = scraper.series()["series"]["events_per_s"]["v"][-1]
    assert rate > 0


def test_freshness_series_are_the_watermark_gap_and_the_time_since_serving_changed_version():
    reg = CollectorRegistry()
    joiner_wm = Gauge("hw_stream_watermark_ms", "x", registry=reg)
    published_wm = Gauge("hw_train_published_watermark_ms", "x", registry=reg)
    version = Gauge("hw_serve_model_version", "x", registry=reg)
    trained_wm = Gauge("hw_train_watermark_ms", "x", registry=reg)
    serve_lag = Gauge("hw_serve_freshness_lag_seconds", "x", registry=reg)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    try:
        scraper = MetricsScraper({"all": f"http://127.0.0.1:{port}/metrics"})
        joiner_wm.set(1_700_000_010_000)
        version.set(3)
        scraper.tick()  # nothing published yet: no gap to report
        scraper._changed["replica_age_s"] = (3.0, scraper._recent[-1].t - 4.0)  # version 3 since 4 s
        published_wm.set(1_700_000_007_500)
        # Serving applied an update with event time 3 s before the newest trained example.
        now = time.time()
        trained_wm.set((now - 10.0) * 1000)
        serve_lag.set(13.0)
        scraper.tick()
        s = scraper.series()["series"]
        assert s["publish_lag_s"]["v"] == [pytest.approx(2.5)]
        assert s["serving_behind_trainer_s"]["v"] == [pytest.approx(3.0, abs=0.5)]
        assert s["replica_age_s"]["v"][-1] >= 4.0
        version.set(4)  # a new version resets the age
        scraper.tick()
        assert scraper.series()["series"]["replica_age_s"]["v"][-1] < 1.0
    finally:
        server.shutdown()
        thread.join()


def _serve(reg):
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    return f"http://127.0.0.1:{port}/metrics", server, thread


def test_freshness_reads_servings_gauges_past_the_idle_copies_other_processes_export_at_zero():
    """Every headwater process imports serving's metrics and exports its gauges at 0; the
    trainer's page comes before serving's, and its zeros must not blank "serving behind
    trainer" nor freeze the replica's age (the defect behind the browser test's empty series)."""
    trainer, serving = CollectorRegistry(), CollectorRegistry()
    trained_wm = Gauge("hw_train_watermark_ms", "x", registry=trainer)
    Gauge("hw_serve_freshness_lag_seconds", "x", registry=trainer)  # idle copy: 0
    Gauge("hw_serve_model_version", "x", registry=trainer)  # idle copy: 0
    serve_lag = Gauge("hw_serve_freshness_lag_seconds", "x", registry=serving)
    version = Gauge("hw_serve_model_version", "x", registry=serving)
    pages = [_serve(trainer), _serve(serving)]
    try:
        scraper = MetricsScraper({"trainer": pages[0][0], "serving": pages[1][0]})
        now = time.time()
        trained_wm.set((now - 100.0) * 1000)  # event time far behind the wall clock, as in a replay
        serve_lag.set(102.0)  # serving applied an update 2 s of event time older
        version.set(7)
        scraper.tick()
        scraper._changed["replica_age_s"] = (7.0, scraper._recent[-1].t - 5.0)  # version 7 since 5 s
        version.set(8)
        scraper.tick()
        s = scraper.series()["series"]
        assert s["serving_behind_trainer_s"]["v"] == [pytest.approx(2.0, abs=0.5)] * 2
        assert s["replica_age_s"]["v"][-1] < 1.0  # serving's new version, not the trainer's 0
    finally:
        for _, server, thread in pages:
            server.shutdown()
            thread.join()
