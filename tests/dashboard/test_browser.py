"""The dashboard page, opened in headless Debian Chromium, draws live charts of a real pipeline."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from dashboard_helpers import free_port, wait_http
from prometheus_client import CollectorRegistry, Counter, start_http_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "needs Debian's chromium: scripts/setup.sh installs it (as root, with apt)"

    with sync_playwright() as pw:
        # A persistent context is how Playwright passes --user-data-dir to the browser.
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                    headless=True, args=ARGS,
                                                    viewport={"width": 1400, "height": 1000})
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def _points(page, chart):
    return int(page.get_attribute(f'svg[data-chart="{chart}"]', "data-points") or 0)


def test_the_page_draws_auc_logloss_throughput_freshness_and_latency_from_live_metrics(pipeline, page, tmp_path):
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(pipeline.dashboard_url)
    charts = ("auc", "logloss", "throughput", "freshness", "latency")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and min(_points(page, c) for c in charts) < 6:
        pipeline.assert_alive()
        page.wait_for_timeout(1000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    if os.environ.get("HW_SCREENSHOT_DIR"):  # to look at it after the run
        shutil.copy(tmp_path / "dashboard.png", os.environ["HW_SCREENSHOT_DIR"])
    drawn = {c: _points(page, c) for c in charts + ("llm_tokens", "llm_kv")}
    assert min(drawn[c] for c in charts) >= 6, drawn

    # Every chart's points are real series values: both AUC lines exist and lie in [0, 1].
    with urllib.request.urlopen(pipeline.dashboard_url + "api/series") as resp:
        body = json.load(resp)
    s = body["series"]
    for name in ("auc_learner", "auc_truth"):
        assert s[name]["v"] and all(0.0 <= v <= 1.0 for v in s[name]["v"]), name
    assert page.locator('svg[data-chart="auc"] path[data-series="auc_truth"]').count() == 1
    assert max(s["events_per_s"]["v"]) > 100
    assert max(s["serve_p99_ms"]["v"]) > 0
    # The trainer publishes every second and serving applies it: the replica never gets old.
    assert s["replica_age_s"]["v"] and max(s["replica_age_s"]["v"]) < 60
    assert s["publish_lag_s"]["v"] and s["serving_behind_trainer_s"]["v"]
    assert page.locator('svg[data-chart="freshness"] path').count() == 3
    # No LLM server among the sources: its charts say so instead of drawing zeros.
    assert drawn["llm_tokens"] == 0 and drawn["llm_kv"] == 0
    assert "no LLM server" in page.inner_text("#card-llm_tokens")
    assert all(body_src["up"] for body_src in body["sources"])
    assert errors == []
    # Self-contained: the page fetched nothing but its own server.
    assert requests and all(u.startswith(pipeline.dashboard_url) for u in requests), set(requests)


def _dashboard(port, sources):
    proc = subprocess.Popen([sys.executable, "-m", "headwater", "dashboard", "--port", str(port),
                             "--sources", sources, "--interval-s", "0.25"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", timeout_s=30)
    return proc


def _server_clock(page):
    text = page.inner_text("#status")  # "live · t=12 s"
    return float(text.split("t=")[1].split()[0]) if "t=" in text else -1.0


def test_an_open_page_keeps_drawing_after_the_dashboard_server_restarts(page):
    reg = CollectorRegistry()
    events = Counter("hw_stream_produced_events", "events", ["source"], registry=reg)
    mport, port = free_port(), free_port()
    server, thread = start_http_server(mport, addr="127.0.0.1", registry=reg)
    stop = threading.Event()
    feeder = threading.Thread(target=lambda: [events.labels("g").inc(100) for _ in iter(lambda: stop.wait(0.05), True)])
    feeder.start()
    proc = _dashboard(port, f"generator=127.0.0.1:{mport}")
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("Number(document.querySelector('svg[data-chart=throughput]').dataset.points) >= 8")
        while _server_clock(page) < 6:  # long enough that the restarted server's clock is visibly behind
            page.wait_for_timeout(250)
        before, drawn = _server_clock(page), _points(page, "throughput")
        proc.terminate()
        proc.wait(timeout=15)
        proc = _dashboard(port, f"generator=127.0.0.1:{mport}")
        deadline = time.monotonic() + 30

        def redrawn():  # the new server's history only: fewer points than before, and growing
            return 0 <= _server_clock(page) < before and 3 <= _points(page, "throughput") < drawn

        while time.monotonic() < deadline and not redrawn():
            page.wait_for_timeout(250)
        assert redrawn(), (before, drawn, _server_clock(page), _points(page, "throughput"))
    finally:
        stop.set()
        feeder.join()
        proc.terminate()
        proc.wait(timeout=15)
        server.shutdown()
        thread.join()
