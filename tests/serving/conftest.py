"""Fixtures: a real gRPC server on a loopback port around a real (random-weight) model."""

import threading
import time

import grpc
import pytest

from serving.config import ServeConfig
from serving.pb import pb2_grpc
from serving.server import RecommendServer, StaticModelSource


@pytest.fixture
def start_server():
    """``start_server(model=None, **config) -> (server, stub)``; everything is stopped afterwards."""
    started = []

    def start(model=None, **kw):
        kw.setdefault("precision", "float32")  # exact comparisons with the model definition
        cfg = ServeConfig(port=0, **kw)
        server = RecommendServer(cfg, StaticModelSource(model)).start()
        channel = grpc.insecure_channel(server.address)
        started.append((server, channel))
        return server, pb2_grpc.RecommenderStub(channel)

    yield start
    for server, channel in started:
        channel.close()
        server.stop(0)


def _monitors() -> int:
    return sum(t.name == "serve-monitor" for t in threading.enumerate())


@pytest.fixture(autouse=True)
def no_leaked_servers():
    """A server a test forgets to stop keeps publishing process-wide gauges into later tests."""
    before = _monitors()
    yield
    deadline = time.monotonic() + 5
    while _monitors() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _monitors() <= before, "a RecommendServer started by this test is still running"
