"""Priority classes of the one serving runtime, and the gate that lets urgent work go first.

One process serves DLRM scoring (gRPC Recommend), the LLM rerank stage, ``/v1/rank`` and
generation. Inside the LLM engine the classes order the scheduler's queue (lower first, with the
core's ageing so nothing starves). Across the two engines they share the CPU/GPU: a DLRM forward
takes a millisecond, an LLM step tens of them, so a DLRM call that arrives while the LLM steps
would wait a whole step. :class:`ComputeGate` is the one rule between them: work of the DLRM
class marks itself in flight, and the LLM's driver thread waits (a bounded time) for the gate to
clear before each step, so scoring never queues behind a step that started after it arrived,
and the LLM still makes progress under a steady scoring load.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Priority", "ComputeGate"]


class Priority(enum.IntEnum):
    """Service classes, most urgent first (the batching core serves lower values first)."""

    DLRM = 0  # Recommend / Score: the tower's forward
    RERANK = 1  # the LLM scoring of Recommend's top candidates
    RANK = 2  # POST /v1/rank
    GENERATE = 3  # /v1/completions and chat


class ComputeGate:
    """Counts urgent work in flight; background work waits for it to drain, up to ``max_wait_s``.

    ``max_wait_s`` bounds how long one background step can be held back, so a scoring load that
    never pauses slows the LLM but cannot stop it. ``held_s`` sums the time background work spent
    waiting (exported as a metric by the runtime).
    """

    def __init__(self, max_wait_s: float = 0.02) -> None:
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._urgent = 0
        self.held_s = 0.0
        self.holds = 0

    @property
    def urgent(self) -> int:
        return self._urgent

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Marks one piece of urgent work in flight for the duration of the block."""
        with self._cond:
            self._urgent += 1
        try:
            yield
        finally:
            with self._cond:
                self._urgent -= 1
                if self._urgent == 0:
                    self._cond.notify_all()

    def wait_clear(self) -> float:
        """Blocks while urgent work is in flight, at most ``max_wait_s``; returns the time waited."""
        if self._urgent == 0:  # the common case: no lock taken
            return 0.0
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._urgent == 0, timeout=self.max_wait_s)
        waited = time.perf_counter() - t0
        self.held_s += waited
        self.holds += 1
        return waited
