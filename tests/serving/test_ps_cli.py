"""``headwater serve --role ps --shard i/N`` and ``--role recommender --ps ...`` as processes:
shards and recommender become healthy, the recommender ranks like an unsharded server, SIGTERM
stops both cleanly."""

import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ps_fleet_helpers import Fleet, ShardedTrainer, StaticServer, sharded_topics

from serving.pb import pb2, pb2_grpc
from streams.broker import free_port


def _serve(kafka, *flags):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "headwater", "serve", "--bootstrap-servers",
                             kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix, *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _wait_serving(port, service, procs, timeout=90):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return True
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    return False


def test_ps_shard_and_recommender_processes_serve_and_stop_on_sigterm(kafka_broker):
    kafka = sharded_topics(kafka_broker, f"pscli{uuid.uuid4().hex[:8]}", 2)
    trainer = ShardedTrainer(kafka, 2, seed=6)
    trainer.train("item_id", np.arange(200))
    trainer.train("user_id", np.arange(10))
    trainer.pub.publish_snapshot(watermark_ms=int(time.time() * 1000))
    fleet = Fleet(kafka, trainer.topic, 2)  # shard 1 stays in-process; shard 0 is a process
    fleet.kill(0)
    ps_port, rec_port = free_port(), free_port()
    shard0 = _serve(kafka, "--role", "ps", "--shard", "0/2", "--port", str(ps_port))
    rec = _serve(kafka, "--role", "recommender", "--port", str(rec_port), "--ps-deadline-ms", "2000",
                 "--precision", "float32",
                 "--ps", f"127.0.0.1:{ps_port},{fleet.addresses[1]}")
    ref = StaticServer(trainer.model())
    try:
        assert _wait_serving(ps_port, "headwater.v1.ParameterServer", [shard0, rec])
        assert _wait_serving(rec_port, "headwater.v1.Recommender", [shard0, rec])
        stub = pb2_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{rec_port}"))
        req = pb2.RecommendRequest(user_id=4, candidate_item_ids=list(range(0, 200, 5)))
        got = {i.item_id: i.score for i in stub.Recommend(req, timeout=10).items}
        want = {i.item_id: i.score for i in ref.stub.Recommend(req, timeout=10).items}
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6, atol=1e-7)
        for p in (rec, shard0):
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=30) == 0
    finally:
        for p in (rec, shard0):
            if p.poll() is None:
                p.kill()
                p.wait()
        ref.close()
        fleet.close()
        trainer.close()


@pytest.mark.parametrize("flags,message", [
    (["--role", "recommender"], "needs --ps"),
    (["--role", "ps", "--shard", "2/2"], "index must be in"),
    (["--role", "ps", "--shard", "one/2"], "INDEX/COUNT"),
    (["--role", "all", "--shard", "1/2"], "--role ps --shard"),
    (["--role", "router"], "role must be"),
])
def test_bad_role_and_shard_flags_are_a_clear_error_before_anything_starts(flags, message, capsys):
    from headwater.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--bootstrap-servers", "127.0.0.1:1", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
