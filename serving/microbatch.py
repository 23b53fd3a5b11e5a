"""Micro-batching: concurrent ``Recommend`` calls share one model forward under a latency budget.

The queue is the generic batching core (a bounded queue of costed, prioritised jobs with
deadlines and a budgeted batch former, :class:`BatchQueue`); this module's *policy* is the
serving one: form a batch as soon as the worker is free, take jobs until the row budget is spent,
and wait at most ``max_wait_ms`` after the oldest job arrived for more to join. Under a closed
loop the batch grows by itself: the calls that arrive while one forward runs form the next.

Limits: the queue holds at most ``max_queue`` jobs (:class:`Overloaded` beyond, which the server
maps to RESOURCE_EXHAUSTED); a job whose deadline passed before its batch formed is failed with
:class:`DeadlineExpired` and costs no compute.

Note: the architecture wants one batching core shared with ``llm_engine.batching``; that module
had not landed when this was written, so :class:`BatchQueue` stands in with the same shape
(submit / form_batch / deadlines / priorities) and is meant to be replaced by it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

log = logging.getLogger(__name__)

__all__ = ["Overloaded", "DeadlineExpired", "Job", "BatchQueue", "MicroBatcher", "BatcherConfig"]

T = TypeVar("T")


class Overloaded(RuntimeError):
    """The bounded queue is full: shed load instead of growing memory."""


class DeadlineExpired(TimeoutError):
    """The job's deadline passed before it was scored."""


@dataclass(order=True)
class Job(Generic[T]):
    """One queued unit of work: ``payload`` costs ``cost`` budget units; lower ``priority`` first."""

    sort_key: tuple[int, int] = field(init=False, repr=False)
    priority: int
    seq: int
    payload: T = field(compare=False)
    cost: int = field(compare=False, default=1)
    deadline: float = field(compare=False, default=float("inf"))  # time.monotonic() seconds
    arrived: float = field(compare=False, default=0.0)
    future: Future = field(compare=False, default_factory=Future)

    def __post_init__(self) -> None:
        self.sort_key = (self.priority, self.seq)


class BatchQueue(Generic[T]):
    """Bounded priority queue + budgeted batch former (the generic batching core)."""

    def __init__(self, max_jobs: int) -> None:
        self.max_jobs = max_jobs
        self._heap: list[Job[T]] = []
        self._seq = itertools.count()
        self.cond = threading.Condition()

    def __len__(self) -> int:
        return len(self._heap)

    def submit(self, payload: T, cost: int = 1, priority: int = 0,
               deadline: float = float("inf")) -> Job[T]:
        now = time.monotonic()
        job = Job(priority=priority, seq=next(self._seq), payload=payload, cost=cost,
                  deadline=deadline, arrived=now)
        with self.cond:
            if len(self._heap) >= self.max_jobs:
                raise Overloaded(f"queue full ({self.max_jobs} jobs waiting)")
            heapq.heappush(self._heap, job)
            self.cond.notify()
        return job

    def oldest_arrival(self) -> float | None:
        with self.cond:
            return min((j.arrived for j in self._heap), default=None)

    def queued_cost(self) -> int:
        with self.cond:
            return sum(j.cost for j in self._heap)

    def form_batch(self, budget: int, now: float | None = None) -> tuple[list[Job[T]], list[Job[T]]]:
        """Pops jobs in priority order while they fit ``budget`` (the first always fits).

        Returns ``(batch, expired)``: jobs past their deadline or cancelled are popped into
        ``expired`` instead of the batch.
        """
        now = time.monotonic() if now is None else now
        batch, expired, spent = [], [], 0
        with self.cond:
            while self._heap:
                job = self._heap[0]
                if job.deadline <= now or job.future.cancelled():
                    expired.append(heapq.heappop(self._heap))
                    continue
                if batch and spent + job.cost > budget:
                    break
                batch.append(heapq.heappop(self._heap))
                spent += job.cost
        return batch, expired


@dataclass
class BatcherConfig:
    """The serving policy's knobs."""

    max_batch_rows: int = 8192  # row budget of one forward
    max_wait_ms: float = 1.0  # how long the oldest job may wait for company
    max_queue: int = 512  # jobs waiting at most; more -> Overloaded
    workers: int = 1  # forward threads (more only help when cores are idle)


class MicroBatcher(Generic[T]):
    """Runs ``forward(payloads) -> results`` on batches formed from concurrent ``submit`` calls.

    ``cfg.workers`` threads run forwards (torch releases the GIL inside them): while one computes,
    the next batch forms and starts on another core. Handler threads only wait.
    """

    def __init__(self, forward: Callable[[list[T]], Sequence[Any]], cfg: BatcherConfig,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        self.forward = forward
        self.cfg = cfg
        self.queue: BatchQueue[T] = BatchQueue(cfg.max_queue)
        self.on_batch = on_batch
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"microbatcher-{i}", daemon=True)
                         for i in range(max(cfg.workers, 1))]
        for t in self._threads:
            t.start()

    def submit(self, payload: T, cost: int, deadline: float = float("inf"), priority: int = 0) -> Future:
        if self._stop.is_set():
            raise Overloaded("batcher is stopped")
        return self.queue.submit(payload, cost=cost, priority=priority, deadline=deadline).future

    def close(self) -> None:
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        batch, expired = self.queue.form_batch(budget=1 << 62)
        for job in batch + expired:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Overloaded("server shutting down"))

    def _wait_for_batch(self) -> None:
        q, cfg = self.queue, self.cfg
        with q.cond:
            while not q._heap and not self._stop.is_set():
                q.cond.wait(timeout=0.1)
        oldest = q.oldest_arrival()
        if oldest is None:
            return
        wait_until = oldest + cfg.max_wait_ms / 1000.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= wait_until or q.queued_cost() >= cfg.max_batch_rows:
                return
            with q.cond:
                q.cond.wait(timeout=wait_until - now)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wait_for_batch()
            batch, expired = self.queue.form_batch(self.cfg.max_batch_rows)
            for job in expired:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(DeadlineExpired("deadline passed while queued"))
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self.forward([j.payload for j in batch])
            except Exception as exc:  # one bad batch must not kill the worker
                log.exception("batch forward failed")
                for j in batch:
                    j.future.set_exception(exc)
                continue
            for j, r in zip(batch, results):
                j.future.set_result(r)
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(j.cost for j in batch))
