"""Metrics of one process can be read by another over loopback (the demo's live view does it)."""


from prometheus_client import CollectorRegistry, Counter, start_http_server

from headwater.metrics import scrape
from streams.broker import free_port


def test_scrape_reads_counters_with_labels():
    registry = CollectorRegistry()
    c = Counter("hw_test_things", "things", ["kind"], registry=registry)
    c.labels(kind="a").inc(3)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
    assert samples["hw_test_things_total"] == [({"kind": "a"}, 3.0)]


def test_scrape_of_nothing_is_empty():
    assert scrape(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=0.2) == {}
