"""`headwater demo` runs the pipeline end to end as real processes (the LLM reranking inside
serving) and leaves none behind."""

import json
import re
import subprocess
import sys
import time
import urllib.request

from demo_helpers import processes_matching as _processes_matching

from streams.broker import free_port


def test_demo_runs_end_to_end_and_stops_cleanly(tmp_path):
    dashboard_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater", "demo", "--duration", "60", "--json",
         "--data-dir", str(tmp_path / "hw"), "--dashboard-port", str(dashboard_port),
         "--rerank-every", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    series = _poll_dashboard(dashboard_port, proc)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["events"] > 10000
    assert summary["examples"] > 1000
    assert summary["dlq"] == 0
    assert summary["trained"] > 1000
    assert summary["model_version"] is not None  # serving applied the trainer's parameters
    # Early emission by default; the generator's history comes first, the fresh trainer's cold
    # start happens on it, and serving opens once the trainer is warm and caught up.
    assert summary["join_emit"] == "early" and summary["serving_opened_s"] > 0, summary
    assert "end_to_end_steady_p99_s" in summary and summary["end_to_end_p99_s"] is not None
    assert summary["serving_calls"] > 0 and summary["serving_errors"] == 0
    # The LLM runs inside serving and reranks every 5th call with the user's live history; a
    # rerank it cannot finish in time is answered in DLRM order (degraded), never failed.
    assert summary["rerank_asked"] > 0 and summary["llm_errors"] == 0
    assert summary["llm_calls"] > 0, summary["rerank_degraded"]
    assert summary["llm_calls"] + sum(summary["rerank_degraded"].values()) == summary["rerank_asked"]
    assert _processes_matching(str(tmp_path)) == set()
    broker_url = re.search(r"starting tansu on (tcp://[0-9.:]+)", err).group(1)
    assert _processes_matching(broker_url) == set()
    assert (tmp_path / "hw" / "logs" / "joiner.log").exists()
    assert series is not None, "the demo's dashboard never answered /api/series"


def _poll_dashboard(port: int, proc: subprocess.Popen) -> dict | None:
    """The dashboard's series once it has data, polled while the demo runs."""
    deadline = time.monotonic() + 90  # serving (a source) opens once the trainer is warm
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/series", timeout=2) as r:
                data = json.loads(r.read())
            events = data["series"].get("events_per_s", {}).get("v", [])
            if len(events) >= 3 and all(src["up"] for src in data["sources"]):
                return data
        except (OSError, ValueError):
            pass
        time.sleep(1)
    return None
