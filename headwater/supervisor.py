"""Runs a set of child processes as one unit: restarts a crashed child, stops all on request.

Each child runs in its own process group so that stopping it also stops whatever it started;
``stop()`` sends SIGTERM, waits, then SIGKILLs stragglers, so nothing is left behind.

Most children are services: any exit is a crash. A *finite* child (``ChildSpec.finite``) is a
job, such as a log replay, that ends by itself: exit 0 means it is done (recorded, not
restarted), any other exit is still a crash.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class ChildSpec:
    """One supervised process: a name, its argv, how often it may be restarted, and whether it
    is a job that ends (``finite``: exit 0 is done, not a crash)."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 5
    log_file: Path | None = None
    finite: bool = False


class ChildFailed(RuntimeError):
    """A child exited unexpectedly and has no restarts left."""

    def __init__(self, name: str, code: int, restarts: int, log_file: Path | None) -> None:
        super().__init__(f"{name} exited with {code} and has used its {restarts} restarts")
        self.name, self.code, self.log_file = name, code, log_file


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen
    started: float
    restarts: int = 0
    done: bool = False  # a finite child that exited 0


class Supervisor:
    """Starts children in order, restarts those that exit unexpectedly, stops all on ``stop()``."""

    def __init__(self, specs: list[ChildSpec], stop_timeout_s: float = 10.0) -> None:
        self.specs = specs
        self.stop_timeout_s = stop_timeout_s
        self.children: dict[str, _Child] = {}
        self._stopping = False

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen:
        out = open(spec.log_file, "ab") if spec.log_file else subprocess.DEVNULL
        env = {**os.environ, **spec.env}
        log.info("starting %s: %s", spec.name, " ".join(spec.argv))
        try:
            return subprocess.Popen(spec.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if spec.log_file:
                out.close()

    def start(self, spec: ChildSpec) -> None:
        """Starts one child now (children may be added after others are up)."""
        self.children[spec.name] = _Child(spec, self._spawn(spec), time.monotonic())

    def start_all(self) -> None:
        for spec in self.specs:
            self.start(spec)

    def poll(self) -> list[str]:
        """Restarts children that exited; returns the names restarted. Call it periodically.

        A finite child that exited 0 is marked done instead (see :meth:`done`). Raises
        :class:`ChildFailed` for a child that exited unexpectedly with no restarts left.
        """
        restarted = []
        for name, child in self.children.items():
            if child.done:
                continue
            code = child.proc.poll()
            if code is None or self._stopping:
                continue
            if code == 0 and child.spec.finite:
                log.info("%s finished", name)
                child.done = True
                continue
            if child.restarts >= child.spec.max_restarts:
                raise ChildFailed(name, code, child.spec.max_restarts, child.spec.log_file)
            log.warning("%s exited with %s; restarting", name, code)
            child.proc = self._spawn(child.spec)
            child.started = time.monotonic()
            child.restarts += 1
            restarted.append(name)
        return restarted

    def done(self, name: str) -> bool:
        """Whether the finite child ``name`` has exited 0 (as seen by the last :meth:`poll`)."""
        child = self.children.get(name)
        return child is not None and child.done

    def stop(self) -> None:
        """SIGTERM every child's process group (newest first), then SIGKILL what is left."""
        self._stopping = True
        for child in reversed(list(self.children.values())):
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in reversed(list(self.children.values())):
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.spec.name)
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()

    def __enter__(self) -> "Supervisor":
        self.start_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
