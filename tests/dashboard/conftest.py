"""A real, small pipeline for the dashboard to watch: broker, generator, joiner, trainer, serving
and the dashboard server, each a ``headwater`` process on loopback, plus a gRPC client."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_helpers import free_port, wait_http



class Pipeline:
    """Children started with ``spawn``; ``stop`` ends them (SIGTERM, then kill) and the client."""

    def __init__(self, root: Path, bootstrap: str, prefix: str) -> None:
        self.root, self.bootstrap, self.prefix = root, bootstrap, prefix
        self.procs: dict[str, subprocess.Popen] = {}
        self.metrics: dict[str, int] = {}
        self.stop_client = threading.Event()
        self.calls = 0

    def spawn(self, name: str, argv: list[str], metrics: bool = True) -> None:
        if metrics:
            self.metrics[name] = free_port()
            argv = argv + ["--metrics-port", str(self.metrics[name])]
        log = open(self.root / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "headwater", *argv], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)

    def kafka(self) -> list[str]:
        return ["--bootstrap-servers", self.bootstrap, "--topic-prefix", self.prefix]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    def assert_alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, f"{name} exited with {p.returncode}:\n{self.log(name)}"

    def call_serving(self, port: int) -> None:
        """Recommend calls from a client thread once serving answers (feeds hw_serve_*)."""
        import grpc

        from serving.pb import pb2, pb2_grpc

        def loop() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb2_grpc.RecommenderStub(ch)
                while not self.stop_client.wait(0.05):
                    try:
                        stub.Recommend(pb2.RecommendRequest(user_id=self.calls % 500,
                                                            candidate_item_ids=list(range(50))), timeout=2)
                        self.calls += 1
                    except grpc.RpcError:
                        self.stop_client.wait(0.5)  # no model yet: try again shortly

        self._client = threading.Thread(target=loop, daemon=True)
        self._client.start()

    def stop(self) -> None:
        self.stop_client.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()



@pytest.fixture(scope="module")
def pipeline(kafka_broker):
    root = Path(tempfile.mkdtemp(prefix="hw-dash-"))
    prefix = f"dash{os.getpid()}"
    kafka_broker.create_topics(prefix)
    p = Pipeline(root, kafka_broker.bootstrap_servers, prefix)
    serve_port = free_port()
    try:
        p.spawn("generator", ["generate", *p.kafka(), "--events-per-s", "3000", "--no-final-watermark",
                              "--request-interval-ms", "50", "--users", "2000", "--items", "5000"])
        p.spawn("joiner", ["join", *p.kafka(), "--state-dir", str(root / "joiner"), "--window-s", "30"])
        p.spawn("trainer", ["train", *p.kafka(), "--json", "--eval-window", "1500", "--torch-threads", "1",
                            "--hidden", "64,32", "--checkpoint-interval-s", "600"])
        p.spawn("serving", ["serve", *p.kafka(), "--port", str(serve_port), "--torch-threads", "1"])
        dash = free_port()
        sources = ",".join(f"{n}=127.0.0.1:{port}" for n, port in p.metrics.items())
        p.spawn("dashboard", ["dashboard", "--sources", sources, "--port", str(dash)], metrics=False)
        p.dashboard_url = f"http://127.0.0.1:{dash}/"
        wait_http(p.dashboard_url + "health")
        p.call_serving(serve_port)
        yield p
    finally:
        p.stop()
        shutil.rmtree(root, ignore_errors=True)
