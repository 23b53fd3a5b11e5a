"""Asyncio front of the engine: per-request token streams, cancellation frees KV blocks at once.

One background task drives ``LLMEngine.step()`` in a worker thread while requests exist; adds and
aborts happen between steps under a lock, so the engine is only ever touched by one thread at a
time. ``generate`` is an async iterator of :class:`RequestOutput` (one per new token, the last
with ``finished=True``); leaving the loop early or cancelling the task aborts the request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from llm_engine.engine import LLMEngine
from llm_engine.outputs import RequestOutput
from llm_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    """Wraps an :class:`LLMEngine` for concurrent streaming clients on one event loop."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop_task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._ids = itertools.count()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        rid = request_id or f"async-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            self.engine.add_request(prompt, params, request_id=rid, priority=priority)
        self._queues[rid] = queue
        self._ensure_loop()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are back in the pool when this returns."""
        with self._lock:
            self.engine.abort_request(request_id)

    def _ensure_loop(self) -> None:
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            return self.engine.step() if self.engine.has_unfinished() else []

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outs = await asyncio.to_thread(self._step)
            except Exception as exc:  # surface engine errors to every waiting stream
                logger.exception("engine step failed")
                for q in self._queues.values():
                    q.put_nowait(exc)
                return
            for out in outs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
