"""Per-server state shared by the routes: the engine backend, settings, and admission control."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, TypeVar

from fastapi import Request

from serving.http import metrics
from serving.http.backend import Backend
from serving.http.config import HttpServerConfig
from serving.http.errors import APIError

T = TypeVar("T")


class Admission:
    """A bounded number of admitted requests; the next one gets 429 with ``Retry-After``.

    Refusing at the door keeps latency bounded and memory safe: the engine queues what was
    admitted, and clients back off instead of piling up.
    """

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit, self.retry_after_s, self.in_flight = limit, retry_after_s, 0

    def acquire(self) -> None:
        if self.full:
            raise self.rejection()
        self.in_flight += 1
        metrics.IN_FLIGHT.set(self.in_flight)

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit

    def rejection(self) -> APIError:
        metrics.REJECTED.inc()
        return APIError(
            429,
            f"server is at capacity ({self.limit} requests in flight); retry after {self.retry_after_s} s",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def release(self) -> None:
        self.in_flight -= 1
        metrics.IN_FLIGHT.set(self.in_flight)


@dataclass
class ServerState:
    """What every route needs; one per app."""

    backend: Backend
    config: HttpServerConfig
    admission: Admission = field(init=False)
    special_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.max_pending_requests, self.config.retry_after_s)

    def check_model(self, model: str | None) -> None:
        """``model`` is a name matched against the served one, never a path: no request field
        ever reaches the file system (an unknown name is a 404, as OpenAI answers)."""
        if model is not None and model != self.backend.model_id:
            raise APIError(404, f"model {model[:100]!r} does not exist; this server serves "
                                f"{[self.backend.model_id]}", "model")

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Runs ``work`` but cancels it when the client goes away (cancelling aborts the
        engine requests, which frees their KV blocks)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.disconnect_poll_s)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise APIError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
