"""Running engine requests for one HTTP call: fan-out over ``n`` choices, merged streams,
latency metrics, SSE framing, and cancellation that reaches the engine."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from serving.http import metrics
from serving.http.backend import Backend, GenerateParams, TokenEvent


@dataclass
class ChoiceState:
    """Accumulated output of one choice (for non-streaming answers and usage)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None

    def add(self, ev: TokenEvent) -> None:
        self.token_ids += ev.token_ids
        self.text += ev.text
        if ev.logprobs is not None:
            self.logprobs += ev.logprobs
        if ev.top_logprobs is not None:
            self.top_logprobs += ev.top_logprobs
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        self.prompt_tokens = ev.prompt_tokens or self.prompt_tokens
        self.finish_reason = ev.finish_reason or self.finish_reason


@dataclass
class Job:
    """One engine request: which choice it answers, its prompt and its settings."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: GenerateParams


async def _timed(backend: Backend, job: Job) -> AsyncIterator[TokenEvent]:
    start = last = time.perf_counter()
    first = True
    metrics.PROMPT_TOKENS.inc(len(job.prompt_ids))
    async for ev in backend.generate(job.request_id, job.prompt_ids, job.params):
        now = time.perf_counter()
        if ev.token_ids:
            if first:
                metrics.TTFT.observe(now - start)
                first = False
            else:
                metrics.ITL.observe((now - last) / len(ev.token_ids))
            last = now
            metrics.OUTPUT_TOKENS.inc(len(ev.token_ids))
        yield ev


async def merged(backend: Backend, jobs: list[Job]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of all jobs as they come, tagged with the job's choice index. Leaving early (an
    exception, a client disconnect cancelling the consumer) aborts every unfinished job."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(job: Job) -> None:
        try:
            async for ev in _timed(backend, job):
                await queue.put((job.index, ev))
        except Exception as exc:  # noqa: BLE001 - surfaced to the consumer below
            await queue.put((job.index, exc))
        finally:
            await queue.put((job.index, done))

    tasks = [asyncio.create_task(pump(j)) for j in jobs]
    remaining = len(jobs)
    finished: set[int] = set()
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
                finished.add(index)
                continue
            if isinstance(item, Exception):
                raise item
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        for job in jobs:
            if job.index not in finished:
                await backend.abort(job.request_id)
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(backend: Backend, jobs: list[Job]) -> dict[int, ChoiceState]:
    states = {j.index: ChoiceState() for j in jobs}
    async for index, ev in merged(backend, jobs):
        states[index].add(ev)
    return states


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
