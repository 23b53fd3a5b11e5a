"""``headwater serve --processes N``: N serving processes on one port, under one supervisor.

Why: one Python serving process tops out near one core, because its event loop (gRPC, request
parsing, responses) and its micro-batcher share one GIL. On a 2-core box at 32 concurrent
clients one process answered 860-1,080 ``Recommend`` calls/s with CPU to spare, two on one port
1,090-1,700 (``headwater bench serving --processes 1`` vs ``2``); there, with the load generator
on the same two cores, the gain is in throughput, not in latency at low concurrency. More
processes are the standard way to use more cores from Python; each batches its own connections.

The supervisor serves no RPC and holds no model. It

- reserves the port (a free one for port 0) with a socket bound with ``SO_REUSEPORT`` but not
  listening, so that every child can bind it too; the kernel then spreads *connections* over the
  children (one HTTP/2 connection stays on one process: clients need several connections);
- starts each child as the same ``headwater serve`` command line plus overrides
  (``--processes 1 --reuse-port --port P --metrics-port 0``, ``--state-dir <dir>/process-<i>``):
  only argv and the environment cross the process boundary;
- restarts a child that exits while it should be serving (with back-off if it keeps dying);
- merges their metrics (:meth:`ServeProcesses.registry`, for one ``/metrics``): prometheus_client's
  multiprocess mode, children writing their series to a private directory; counters and
  histograms are summed, gauges say per gauge how they combine (``serving.metrics``);
- on stop, sends SIGTERM to each child and waits (each persists its replica on the way out); a
  child also gets SIGTERM from the kernel if the supervisor itself dies (``HW_SERVE_SUPERVISOR_PID``
  tells the child to ask for that).

Each child is a complete server: with ``--role all`` it follows ``hw.params`` into a replica of
its own (memory times N); with ``--role recommender`` it is a front end over the ``--ps`` fleet.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from streams.broker import stop_processes

log = logging.getLogger(__name__)

__all__ = ["reserve_port", "ServeProcesses", "child_argv"]


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one) with ``SO_REUSEPORT``, not listening.

    Keeping it open keeps the port ours while the children start and restart; since it never
    listens, the kernel never hands it a connection."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


def child_argv(argv: Sequence[str], index: int, port: int, state_dir: str) -> list[str]:
    """The command of child ``index``: the supervisor's own arguments, then the overrides (later
    flags win over earlier ones, over ``--config`` and over ``HW_*`` variables)."""
    cmd = [sys.executable, "-m", "headwater", *argv, "--processes", "1", "--reuse-port",
           "--port", str(port), "--metrics-port", "0"]
    if state_dir:
        cmd += ["--state-dir", str(Path(state_dir) / f"process-{index}")]
    return cmd


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = 1.0
    restart_at: float = 0.0


@dataclass
class ServeProcesses:
    """Starts, watches and stops ``n`` children of ``argv`` (see the module docstring)."""

    argv: Sequence[str]
    n: int
    host: str
    port: int
    state_dir: str = ""
    crash_loop_s: float = 10.0  # a child that dies sooner than this after starting backs off
    max_backoff_s: float = 30.0
    children: list[_Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = reserve_port(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self.metrics_dir = tempfile.mkdtemp(prefix="hw-serve-metrics-")
        self._env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir,
                         HW_SERVE_SUPERVISOR_PID=str(os.getpid()))
        self._lock = threading.Lock()
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "ServeProcesses":
        self.children = [_Worker(i) for i in range(self.n)]
        for child in self.children:
            self._spawn(child)
        log.info("%d serving processes on %s", self.n, self.address)
        return self

    def _spawn(self, child: _Worker) -> None:
        cmd = child_argv(self.argv, child.index, self.port, self.state_dir)
        child.proc = subprocess.Popen(cmd, env=self._env)
        child.started = time.monotonic()
        log.info("serving process %d started (pid %d)", child.index, child.proc.pid)

    def registry(self) -> Any:
        """A Prometheus registry whose collection merges every child's series (serve it on one
        ``/metrics``)."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        return registry

    def poll(self) -> None:
        """Restarts children that exited (call it periodically while serving)."""
        from prometheus_client.multiprocess import mark_process_dead

        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is not None:
                    mark_process_dead(proc.pid, self.metrics_dir)
                    quick = now - child.started < self.crash_loop_s
                    child.backoff_s = min(child.backoff_s * 2, self.max_backoff_s) if quick else 1.0
                    child.restart_at = now + child.backoff_s
                    log.error("serving process %d (pid %d) exited with %s; restarting in %.0f s",
                              child.index, proc.pid, proc.returncode, child.backoff_s)
                    child.proc = None
                if child.proc is None and now >= child.restart_at:
                    self._spawn(child)

    def alive(self) -> int:
        return sum(1 for c in self.children if c.proc is not None and c.proc.poll() is None)

    def stop(self, timeout_s: float = 30.0) -> list[int | None]:
        """SIGTERM to every child, then wait (SIGKILL after ``timeout_s``); their exit codes."""
        with self._lock:
            self._stopping = True
        procs = [c.proc for c in self.children if c.proc is not None]
        codes: list[int | None] = list(stop_processes(procs, timeout_s))
        self._sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return codes
