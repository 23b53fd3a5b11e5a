"""Serving exports end-to-end freshness (p50 / p99 of its once-a-second lag samples) on /metrics."""

import time

from prometheus_client import REGISTRY

from serving.testing import random_model


def _gauge(quantile: str) -> float | None:
    return REGISTRY.get_sample_value("hw_serve_end_to_end_seconds", {"quantile": quantile})


def test_a_serving_process_exports_its_end_to_end_quantiles(start_server):
    # The served model's newest example happened 7 s ago: every sample is about 7 s.
    server, _stub = start_server(random_model(watermark_ms=int(time.time() * 1000) - 7000))
    # (the registry is process-wide: an earlier test's server may have left other values)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (server.end_to_end.samples and (_gauge("0.5") or 0) >= 7.0):
        time.sleep(0.05)
    assert server.end_to_end.samples, "no end-to-end sample within 10 s"
    p50, p99 = _gauge("0.5"), _gauge("0.99")
    assert p50 is not None and 7.0 <= p50 < 9.0
    assert p99 is not None and p50 <= p99 < 9.0
