"""Micro-batching: concurrent ``Recommend`` calls share one model forward under a latency budget.

The queue and the budgeted batch former are the generic batching core of :mod:`batching`
(priorities with ageing, deadlines, a greedy packer); the LLM step scheduler is one policy on it
and this module is the other. :class:`BatchQueue` adds what a
multi-threaded server needs around the core: a lock, a bound (:class:`Overloaded` beyond
``max_jobs``, mapped to RESOURCE_EXHAUSTED), and dropping jobs whose deadline passed
(:class:`DeadlineExpired`, they cost no compute). The serving *policy* (:class:`MicroBatcher`):
form a batch as soon as a worker is free, take jobs until the row budget is spent, and wait at
most ``max_wait_ms`` after the oldest job arrived for more to join, and no longer than it takes
as many jobs as the previous batch had to be queued (adaptive: a lone caller, e.g. one client
in a closed loop, expects no company and is dispatched at once instead of paying the wait).
Under a closed loop the batch grows by itself: the calls that arrive while one forward runs form
the next.

Callers on an asyncio loop use :meth:`MicroBatcher.submit_async`: their results are delivered
with ONE ``call_soon_threadsafe`` per batch and loop (one wake-up of the loop, not one per job as
``asyncio.wrap_future`` would do), which on a small box is a visible share of a call's CPU.

With an ``arbiter`` (``serve --llm``), every job is DLRM work in flight from its submit until its
batch is delivered: the LLM's next step waits its turn behind queued scoring too, not only behind
a running forward (a job waiting ``max_wait_ms`` for company would otherwise wait a whole step).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from batching import BatchQueue as CoreQueue
from batching import Arbiter, Priority, QueueItem, form_batch

log = logging.getLogger(__name__)

__all__ = ["Overloaded", "DeadlineExpired", "Job", "BatchQueue", "MicroBatcher", "BatcherConfig"]

T = TypeVar("T")


class Overloaded(RuntimeError):
    """The bounded queue is full: shed load instead of growing memory."""


class DeadlineExpired(TimeoutError):
    """The job's deadline passed before it was scored."""


@dataclass
class Job(Generic[T]):
    """One queued call: ``payload`` costs ``cost`` rows; its result arrives on ``future``.

    ``future`` is a ``concurrent.futures.Future``, or an ``asyncio.Future`` of ``loop`` when the
    caller waits on an event loop (then only that loop's thread may settle it).
    """

    payload: T
    cost: int = 1
    priority: int = 0
    deadline: float = float("inf")  # time.monotonic() seconds
    arrived: float = 0.0
    future: Any = field(default_factory=Future)
    loop: asyncio.AbstractEventLoop | None = None

    def claim(self) -> bool:
        """True when the job is still wanted (a thread future is marked running)."""
        if self.loop is None:
            return self.future.set_running_or_notify_cancel()
        return not self.future.done()


def _settle(outcomes: list[tuple[Any, bool, Any]]) -> None:
    """On a job's loop: set each still-pending asyncio future's result (or exception)."""
    for fut, ok, value in outcomes:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def deliver(jobs: Sequence[Job], values: Sequence[Any], ok: bool | Sequence[bool] = True) -> None:
    """Settle ``jobs`` with ``values`` (results when ``ok``, else exceptions); one loop wake-up per loop."""
    per_loop: dict[Any, list[tuple[Any, bool, Any]]] = {}
    oks = [ok] * len(jobs) if isinstance(ok, bool) else ok
    for job, value, good in zip(jobs, values, oks):
        if job.loop is None:
            if good:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)
        else:
            per_loop.setdefault(job.loop, []).append((job.future, good, value))
    for loop, outcomes in per_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, outcomes)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class BatchQueue(Generic[T]):
    """Thread-safe, bounded serving queue on the generic core (see module docstring)."""

    def __init__(self, max_jobs: int, aging_s: float = 1.0) -> None:
        self.max_jobs = max_jobs
        self.core: CoreQueue[Job[T]] = CoreQueue(aging_s=aging_s)
        self._keys = itertools.count()
        self.cond = threading.Condition()
        self._cost = 0  # rows queued, kept as jobs come and go
        # A submit wakes a waiter only once this many jobs (or rows) wait: the batcher, waiting
        # for company, sets them to what it waits for, so it is not woken (a thread switch and
        # a GIL hand-over on the submitting event loop) by every call that cannot end its wait.
        self.wake_jobs = 1
        self.wake_cost = 1

    def __len__(self) -> int:
        return len(self.core)

    def submit(self, payload: T, cost: int = 1, priority: int = 0,
               deadline: float = float("inf"), loop: asyncio.AbstractEventLoop | None = None) -> Job[T]:
        future = Future() if loop is None else loop.create_future()
        with self.cond:
            if len(self.core) >= self.max_jobs:
                raise Overloaded(f"queue full ({self.max_jobs} jobs waiting)")
            now = time.monotonic()  # under the lock: queue order is arrival order
            job = Job(payload=payload, cost=cost, priority=priority, deadline=deadline, arrived=now,
                      future=future, loop=loop)
            self.core.push(QueueItem(key=next(self._keys), payload=job, priority=priority,
                                     arrival=now, deadline=deadline))
            self._cost += cost
            if len(self.core) >= self.wake_jobs or self._cost >= self.wake_cost:
                self.cond.notify()
        return job

    def oldest_arrival(self) -> float | None:
        with self.cond:  # items keep insertion order, which is arrival order (see submit)
            return next(iter(self.core.items.values())).arrival if self.core.items else None

    def queued_cost(self) -> int:
        return self._cost

    def form_batch(self, budget: int, now: float | None = None) -> tuple[list[Job[T]], list[Job[T]]]:
        """Jobs in the core's service order while they fit ``budget`` (the first always fits).

        Returns ``(batch, expired)``: jobs past their deadline or cancelled are removed into
        ``expired`` instead of the batch.
        """
        now = time.monotonic() if now is None else now
        with self.cond:
            dead = [it for it in self.core.items.values()
                    if it.deadline <= now or it.payload.future.cancelled()]
            for it in dead:
                self.core.remove(it.key)
                self._cost -= it.payload.cost
            empty = [True]

            def admit(item: QueueItem[Job[T]], remaining: int) -> int:
                cost = max(item.payload.cost, 1)
                if empty[0] or cost <= remaining:  # a job larger than the budget goes alone
                    empty[0] = False
                    return cost
                return 0

            taken = form_batch(self.core, budget, max_items=len(self.core), admit=admit, now=now)
            self._cost -= sum(it.payload.cost for it, _ in taken)
        return [it.payload for it, _ in taken], [it.payload for it in dead]


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
                 on_batch: Callable[[int, int], None] | None = None, arbiter: Arbiter | None = None) -> None:
        self.forward = forward
        self.arbiter = arbiter
        self.cfg = cfg
        self.queue: BatchQueue[T] = BatchQueue(cfg.max_queue)
        self.on_batch = on_batch
        self._stop = threading.Event()
        self._last_jobs = 1  # jobs in the previous batch: how much company to wait for
        self._threads = [threading.Thread(target=self._loop, name=f"microbatcher-{i}", daemon=True)
                         for i in range(max(cfg.workers, 1))]
        for t in self._threads:
            t.start()

    def submit(self, payload: T, cost: int, deadline: float = float("inf"), priority: int = 0) -> Future:
        if self._stop.is_set():
            raise Overloaded("batcher is stopped")
        return self._submit(payload, cost, deadline, priority, None).future

    def submit_async(self, payload: T, cost: int, deadline: float = float("inf"),
                     priority: int = 0) -> "asyncio.Future[Any]":
        """Like :meth:`submit`, from a coroutine: an ``asyncio.Future`` of the running loop.

        Cancelling it (e.g. the awaiting handler is cancelled) drops the job before its forward.
        """
        if self._stop.is_set():
            raise Overloaded("batcher is stopped")
        return self._submit(payload, cost, deadline, priority, asyncio.get_running_loop()).future

    def _submit(self, payload: T, cost: int, deadline: float, priority: int,
                loop: asyncio.AbstractEventLoop | None) -> Job[T]:
        self._busy(1)  # before the queue: a worker may take the job at once, and leaves it
        try:
            return self.queue.submit(payload, cost=cost, priority=priority, deadline=deadline, loop=loop)
        except BaseException:
            self._busy(-1)
            raise

    def _busy(self, n: int) -> None:
        """``n`` more (or fewer) jobs of DLRM work in flight at the arbiter."""
        if self.arbiter is None or not n:
            return
        if n > 0:
            self.arbiter.enter(Priority.DLRM, n)
        else:
            self.arbiter.leave(Priority.DLRM, -n)

    def close(self) -> None:
        self._stop.set()
        with self.queue.cond:
            self.queue.cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        batch, expired = self.queue.form_batch(budget=1 << 62)
        self._busy(-len(batch) - len(expired))
        left = [j for j in batch + expired if j.claim()]
        deliver(left, [Overloaded("server shutting down")] * len(left), ok=False)

    def _wait_for_batch(self) -> None:
        q, cfg = self.queue, self.cfg
        with q.cond:
            while not len(q) and not self._stop.is_set():
                q.cond.wait(timeout=0.1)
            oldest = q.oldest_arrival()
            if oldest is None:
                return
            wait_until = oldest + cfg.max_wait_ms / 1000.0
            # Woken only when the company waited for is there (or on time-out, or close).
            q.wake_jobs, q.wake_cost = self._last_jobs, cfg.max_batch_rows
            try:
                while not self._stop.is_set():
                    if len(q) >= self._last_jobs or q.queued_cost() >= cfg.max_batch_rows:
                        return
                    now = time.monotonic()
                    if now >= wait_until:
                        return
                    q.cond.wait(timeout=wait_until - now)
            finally:
                q.wake_jobs = q.wake_cost = 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wait_for_batch()
            batch, expired = self.queue.form_batch(self.cfg.max_batch_rows)
            try:
                self._run(batch, expired)
            finally:
                self._busy(-len(batch) - len(expired))

    def _run(self, batch: list[Job[T]], expired: list[Job[T]]) -> None:
        """Settles ``expired`` and runs ``batch`` (the jobs still wanted) through one forward."""
        expired = [j for j in expired if j.claim()]
        if expired:
            deliver(expired, [DeadlineExpired("deadline passed while queued")] * len(expired), ok=False)
        batch = [j for j in batch if j.claim()]
        if not batch:
            return
        try:
            results = self.forward([j.payload for j in batch])
        except Exception as exc:  # one bad batch must not kill the worker
            log.exception("batch forward failed")
            deliver(batch, [exc] * len(batch), ok=False)
            return
        deliver(batch, results)
        self._last_jobs = len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), sum(j.cost for j in batch))
