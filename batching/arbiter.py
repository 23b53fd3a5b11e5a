"""Priority classes of the one serving runtime, and the arbiter that gives the compute to the most urgent.

One process serves DLRM scoring (gRPC Recommend, Score), the LLM rerank stage, ``/v1/rank`` and
generation. Inside the LLM engine the classes order the scheduler's queue (lower first, with the
core's ageing so nothing starves). Across the two engines they share the CPU/GPU: a DLRM forward
takes a millisecond, an LLM step tens of them, so a DLRM call that arrives while the LLM steps
would wait a whole step. :class:`Arbiter` is the one rule between them: work marks itself in
flight in its class (:meth:`Arbiter.busy`), and before each step the LLM's driver thread waits
for its turn (:meth:`Arbiter.wait_turn`) in the class of the most urgent request that step runs.

The turn follows the batching core's ageing: a waiting class moves up one class per ``aging_s``
and goes once no class at or above its aged level is in flight. So a rerank step (class 1) behind
DLRM scoring (class 0) waits at most ``aging_s``, generation (class 3) at most ``3 * aging_s``,
and a scoring load that never pauses slows the LLM but cannot stop it. It is asymmetric: DLRM
work never waits (an LLM step cannot be preempted, so there is nothing to wait for; scoring only
keeps the next step from starting).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Priority", "Arbiter"]


class Priority(enum.IntEnum):
    """Service classes, most urgent first (the batching core serves lower values first)."""

    DLRM = 0  # Recommend / Score: the tower's forward
    RERANK = 1  # the LLM scoring of Recommend's top candidates
    RANK = 2  # POST /v1/rank
    GENERATE = 3  # /v1/completions and chat


class Arbiter:
    """Work in flight per priority class; a class waits its turn behind more urgent work, with ageing.

    ``aging_s`` is how long a waiting class takes to move up one class, so class ``c`` waits at most
    ``(c - most urgent class in flight) * aging_s``. ``holds`` counts the waits that were not
    zero and ``held_s`` sums them (exported as a metric by the runtime).
    """

    def __init__(self, aging_s: float = 0.02 / Priority.GENERATE) -> None:
        self.aging_s = aging_s
        self._cond = threading.Condition()
        self._in_flight = [0] * len(Priority)
        self.held_s = 0.0
        self.holds = 0

    def in_flight(self, cls: int) -> int:
        return self._in_flight[cls]

    def enter(self, cls: int, n: int = 1) -> None:
        """Marks ``n`` pieces of work of class ``cls`` in flight (until :meth:`leave`)."""
        with self._cond:
            self._in_flight[cls] += n

    def leave(self, cls: int, n: int = 1) -> None:
        with self._cond:
            self._in_flight[cls] -= n
            self._cond.notify_all()

    @contextmanager
    def busy(self, cls: int) -> Iterator[None]:
        """Marks one piece of work of class ``cls`` in flight for the duration of the block."""
        self.enter(cls)
        try:
            yield
        finally:
            self.leave(cls)

    def _blocked(self, cls: int, waited: float) -> bool:
        """True while a class more urgent than ``cls`` aged by ``waited`` is in flight."""
        aged = cls - (int(waited / self.aging_s) if self.aging_s > 0 else cls)
        return any(self._in_flight[:max(min(aged, cls), 0)])

    def wait_turn(self, cls: int) -> float:
        """Blocks until class ``cls`` has its turn (see the class docstring); returns the time waited."""
        if not any(self._in_flight[:cls]):  # the common case: no lock taken
            return 0.0
        t0 = time.perf_counter()
        with self._cond:
            while self._blocked(cls, waited := time.perf_counter() - t0):
                # wake at the next ageing step at the latest: the class may go then
                next_step = (int(waited / self.aging_s) + 1) * self.aging_s
                self._cond.wait(timeout=next_step - waited)
        waited = time.perf_counter() - t0
        self.held_s += waited
        self.holds += 1
        return waited
