"""Prometheus plumbing shared by every process.

Components declare their metrics at module level with ``prometheus_client`` (names start with
``hw_``) so that creating two instances in one process never registers a series twice; the CLI
exposes them with :func:`serve_metrics`. The HTTP server mounts :func:`metrics_text` at ``/metrics``.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, start_http_server

log = logging.getLogger(__name__)

__all__ = ["CONTENT_TYPE_LATEST", "metrics_text", "serve_metrics", "sample_value"]


def serve_metrics(port: int, host: str | None = None, registry: CollectorRegistry = REGISTRY) -> None:
    """Starts the ``/metrics`` endpoint of ``registry`` on a daemon thread; port 0 disables it.

    ``host`` defaults to ``$HW_METRICS_HOST`` or loopback: containers (deploy/) set
    ``HW_METRICS_HOST=0.0.0.0`` so Prometheus in another container or pod can scrape them."""
    host = host or os.environ.get("HW_METRICS_HOST", "127.0.0.1")
    if port:
        start_http_server(port, addr=host, registry=registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


def metrics_text() -> bytes:
    """The process's metrics in Prometheus text format."""
    return generate_latest(REGISTRY)


def sample_value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """Current value of one sample in the default registry (tests and the live view read it)."""
    return REGISTRY.get_sample_value(name, labels or {})


def scrape(url: str, timeout_s: float = 1.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Reads another process's ``/metrics``: sample name -> [(labels, value)]; {} if unreachable."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples
