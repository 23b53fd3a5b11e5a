"""``headwater llm serve`` as a process: serves on loopback, stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx


def test_llm_serve_answers_and_stops_on_sigterm(tiny_model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater", "llm", "serve", "--model", str(tiny_model_dir), "--port", "0",
         "--num-kv-blocks", "64"],
        stderr=subprocess.PIPE, text=True)
    try:
        url, deadline, seen = None, time.monotonic() + 60, []
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            line = proc.stderr.readline()
            seen.append(line)
            m = re.search(r"LLM server on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/health").json()["status"] == "ok"
            r = c.post("/v1/rank", json={"context": "science fiction films:", "candidates": [" star wars", " titanic"]})
            assert r.status_code == 200 and len(r.json()["scores"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
