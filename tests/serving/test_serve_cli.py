"""``headwater serve`` as a process: health flips to SERVING on the first snapshot; SIGTERM stops it."""

import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from serving_helpers import Trainer

from serving.pb import pb2
from streams.broker import free_port


def test_serve_process_becomes_healthy_and_stops_on_sigterm(kafka_topics, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater", "serve", "--bootstrap-servers", kafka_topics.bootstrap_servers,
         "--topic-prefix", kafka_topics.topic_prefix, "--port", str(port), "--state-dir", str(tmp_path / "ps")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    trainer = Trainer(kafka_topics)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        req = health_pb2.HealthCheckRequest(service="headwater.v1.Recommender")

        def status():
            try:
                return health.Check(req, timeout=1).status
            except grpc.RpcError:
                return None

        deadline = time.monotonic() + 60
        while status() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        trainer.train("item_id", np.arange(20))
        trainer.pub.publish_snapshot(watermark_ms=int(time.time() * 1000))
        while status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status() == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert (tmp_path / "ps" / "meta.json").exists()  # persisted on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        trainer.close()


def test_metrics_count_requests_latencies_and_batch_sizes(start_server):
    from serving.testing import random_model

    _, stub = start_server(random_model(version=4242))  # a version no other test serves

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    ok0 = value("hw_serve_requests_total", method="Recommend", code="OK")
    bad0 = value("hw_serve_requests_total", method="Recommend", code="INVALID_ARGUMENT")
    lat0 = value("hw_serve_latency_seconds_count", method="Recommend")
    rows0 = value("hw_serve_batch_rows_sum")
    for _ in range(3):
        stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=list(range(25))))
    try:
        stub.Recommend(pb2.RecommendRequest(user_id=1, candidate_item_ids=[1], top_k=10**6))
    except grpc.RpcError:
        pass
    assert value("hw_serve_requests_total", method="Recommend", code="OK") == ok0 + 3
    assert value("hw_serve_requests_total", method="Recommend", code="INVALID_ARGUMENT") == bad0 + 1
    assert value("hw_serve_latency_seconds_count", method="Recommend") == lat0 + 4
    assert value("hw_serve_batch_rows_sum") == rows0 + 75
    deadline = time.monotonic() + 10
    while value("hw_serve_model_version") != 4242 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert value("hw_serve_model_version") == 4242
