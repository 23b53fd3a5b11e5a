"""Several serving processes on one port: SO_REUSEPORT, the supervisor, its merged /metrics."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import Trainer, _wait

from headwater.cli import build_parser
from headwater.config import load_config
from headwater.metrics import scrape
from serving.config import ServeConfig
from serving.param_server import ParamServerConfig
from serving.pb import pb2, pb2_grpc
from serving.processes import child_argv, reserve_port
from serving.server import RecommendServer, StaticModelSource
from serving.testing import random_model
from streams.broker import free_port


def _recommend_over_connections(address, n, **request):
    """One call on each of ``n`` separate connections; their responses."""
    out = []
    for _ in range(n):
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            out.append(pb2_grpc.RecommenderStub(ch).Recommend(pb2.RecommendRequest(**request), timeout=10))
    return out


def test_two_servers_share_a_reserved_port_and_the_kernel_spreads_connections():
    sock = reserve_port("127.0.0.1", 0)
    port = sock.getsockname()[1]
    servers = []
    try:
        for version in (1, 2):  # which process answered shows in model_version
            cfg = ServeConfig(port=port, reuse_port=True, precision="float32")
            servers.append(RecommendServer(cfg, StaticModelSource(random_model(version=version))).start())
        assert {s.port for s in servers} == {port}
        replies = _recommend_over_connections(f"127.0.0.1:{port}", 24, user_id=3, candidate_item_ids=[1, 2, 3])
        assert all(len(r.items) == 3 for r in replies)
        assert {r.model_version for r in replies} == {1, 2}  # all 24 on one: p = 2^-23
        # The default (reuse_port off) refuses a port someone holds: no accidental sharing.
        with pytest.raises(OSError, match="could not bind"):
            RecommendServer(ServeConfig(port=port), StaticModelSource(random_model()))
    finally:
        for s in servers:
            s.stop(0)
        sock.close()


def test_child_command_overrides_port_processes_metrics_and_state_dir(tmp_path):
    argv = ["serve", "--port", "0", "--processes", "3", "--metrics-port", "9100", "--state-dir", str(tmp_path),
            "--max-wait-ms", "2"]
    cmd = child_argv(argv, 1, 50123, str(tmp_path))
    assert cmd[:3] == [sys.executable, "-m", "headwater"]
    args = build_parser().parse_args(cmd[3:])
    cfg, ps = load_config(ServeConfig, args, section="serve"), load_config(ParamServerConfig, args, section="serve")
    assert (cfg.port, cfg.processes, cfg.reuse_port, cfg.metrics_port) == (50123, 1, True, 0)
    assert cfg.max_wait_ms == 2.0  # the supervisor's other flags carry over
    assert ps.state_dir == str(tmp_path / "process-1")
    assert "--state-dir" not in child_argv(["serve"], 0, 1, "")


def test_processes_are_validated():
    with pytest.raises(ValueError, match="processes"):
        ServeConfig(processes=0).validate()
    with pytest.raises(ValueError, match="role ps"):
        ServeConfig(processes=2, role="ps").validate()


def _children(pid):
    """Direct child pids of ``pid`` (Linux /proc)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _requests_ok(url):
    samples = scrape(url).get("hw_serve_requests_total", [])
    return sum(v for labels, v in samples if labels.get("method") == "Recommend" and labels.get("code") == "OK")


def test_serve_processes_share_one_port_restart_a_dead_child_and_merge_metrics(kafka_topics, tmp_path):
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwater", "serve", "--bootstrap-servers", kafka_topics.bootstrap_servers,
         "--topic-prefix", kafka_topics.topic_prefix, "--port", str(port), "--processes", "2",
         "--metrics-port", str(metrics_port), "--state-dir", str(tmp_path / "ps")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log = []  # the supervisor's and its children's stderr, line by line
    threading.Thread(target=lambda: log.extend(line.decode() for line in proc.stderr), daemon=True).start()
    trainer = Trainer(kafka_topics)
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"

    def all_serving(n=8):
        # Fresh connections land on either process: SERVING on all of them means both are.
        for _ in range(n):
            with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service="headwater.v1.Recommender"), timeout=1).status
                except grpc.RpcError:
                    return False
            if status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    try:
        assert _wait(lambda: len(_children(proc.pid)) == 2, 30), "".join(log)
        first = set(_children(proc.pid))
        trainer.train("item_id", np.arange(20))
        trainer.pub.publish_snapshot(watermark_ms=int(time.time() * 1000))
        assert _wait(lambda: _serving_lines(log) == 2, 90), "".join(log)
        assert all_serving()
        replies = _recommend_over_connections(address, 12, user_id=1, candidate_item_ids=list(range(20)), top_k=5)
        assert all(len(r.items) == 5 and r.model_version >= 1 for r in replies)
        # One /metrics for both: requests summed over the processes, the version per gauge rule.
        _wait(lambda: _requests_ok(url) == 12, 10)
        assert _requests_ok(url) == 12
        assert scrape(url)["hw_serve_model_version"][0][1] == replies[0].model_version

        os.kill(min(first), signal.SIGKILL)  # a child dies: the supervisor starts a new one
        assert _wait(lambda: len(set(_children(proc.pid)) - first) == 1 and len(_children(proc.pid)) == 2, 30)
        assert _wait(lambda: _serving_lines(log) == 3, 90), "the restarted process should bootstrap and serve"
        assert all_serving()
        every = first | set(_children(proc.pid))
        assert len(_recommend_over_connections(address, 6, user_id=2, candidate_item_ids=[1, 2])) == 6

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(log)
        assert not _alive(every)
        for i in (0, 1):  # each process persisted its own replica on the way out
            assert (tmp_path / "ps" / f"process-{i}" / "meta.json").exists()
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
        trainer.close()


def _serving_lines(log):
    return sum("health: SERVING" in line for line in list(log))


def _alive(pids):
    """Those of ``pids`` still running (not exited, not a zombie)."""
    def running(pid):
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        except OSError:
            return False
    return [p for p in pids if running(p)]
