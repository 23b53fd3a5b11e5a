"""``headwater dashboard`` as a process: serves the page and the series, refuses bad sources,
stops cleanly on SIGTERM."""

import json
import signal
import subprocess
import sys
import urllib.request

from dashboard_helpers import free_port, wait_http

from serving.dashboard import SERIES


def test_dashboard_process_serves_page_and_series_and_stops_on_sigterm():
    port, dead = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "headwater", "dashboard", "--port", str(port),
                             "--sources", f"gone=127.0.0.1:{dead}", "--interval-s", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_http(base + "health", timeout_s=30)
        with urllib.request.urlopen(base) as resp:
            html = resp.read().decode()
        assert resp.headers["content-type"].startswith("text/html")
        assert "<svg" in html or "createElementNS" in html
        assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # loads nothing remote
        with urllib.request.urlopen(base + "api/series") as resp:
            body = json.load(resp)
        assert body["sources"] == [{"name": "gone", "url": f"http://127.0.0.1:{dead}/metrics", "up": False}]
        assert set(body["series"]) == {s.name for s in SERIES}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_malformed_source_list_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "headwater", "dashboard", "--sources", "joiner"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not name=url" in out.stderr


def test_every_non_llm_series_reads_a_metric_the_components_define():
    import serving.metrics  # noqa: F401
    import streams.metrics  # noqa: F401
    import training.evaluation  # noqa: F401
    import training.sync  # noqa: F401
    import training.trainer  # noqa: F401
    from prometheus_client import REGISTRY

    names = set(REGISTRY._names_to_collectors)
    # hw_llm_* live in serving/http/metrics.py, the LLM server's (not imported here).
    for spec in SERIES:
        if not spec.metric.startswith("hw_llm_"):
            assert spec.metric in names, spec.name
            assert not spec.minus or spec.minus in names, spec.name
