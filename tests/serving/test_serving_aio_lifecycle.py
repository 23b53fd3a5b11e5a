"""The event-loop server starts, stops and fails to bind cleanly (no threads left behind)."""

import socket
import threading

import pytest

from serving.config import ServeConfig
from serving.pb import pb2
from serving.server import RecommendServer, StaticModelSource
from serving.testing import random_model


def _ours():
    return {t.name for t in threading.enumerate()
            if t.name.startswith(("serve-", "microbatcher"))}


def test_a_taken_port_is_an_os_error_and_leaves_no_threads():
    before = _ours()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="could not bind"):
            RecommendServer(ServeConfig(port=taken.getsockname()[1]), StaticModelSource(random_model()))
    assert _ours() <= before


def test_stop_ends_the_loop_batcher_and_monitor_threads(start_server):
    import grpc

    from serving.pb import pb2_grpc

    before = _ours()
    server = RecommendServer(ServeConfig(port=0, precision="float32"), StaticModelSource(random_model())).start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc.RecommenderStub(channel)
        assert len(stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=[1, 2])).items) == 2
    server.stop(0)
    assert not server.loop.is_running()
    left = {t.name for t in threading.enumerate() if t.is_alive()} & (_ours() - before)
    assert not {n for n in left if n.startswith(("serve-loop", "serve-monitor", "microbatcher"))}, left
