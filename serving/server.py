"""The gRPC server: ``headwater.v1.Recommender`` plus standard health and reflection services.

The server is a ``grpc.aio`` server on an event loop of its own thread: handlers are coroutines,
so a micro-batch's results reach their callers without one thread wake-up per call (with a
thread per call, on a small box the batcher thread kept losing the GIL to the handler it had just
woken). Compute never runs on the loop: ranking forwards run on the micro-batcher's thread (or,
with batching off, one forward per call on a pool of ``workers`` threads), and ``Score``,
``GetEmbeddings`` and retrieval on that pool too.

Health reports NOT_SERVING until the model source has a model (a parameter server that loaded a
snapshot); a monitor thread flips it and keeps the version / freshness gauges current. A model
with no hw.params update for ``stale_after_s`` (the trainer is down) is *degraded*, not
unhealthy: gRPC health stays SERVING (a stale model beats no answer) and ``/metrics`` shows
``hw_serve_degraded 1`` with ``hw_serve_params_age_seconds``. Auth, when
a token is configured, is checked by an interceptor in constant time; the health service stays
open so that probes work without credentials.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import metrics as m
from serving.calibration import Calibrator
from serving.config import ServeConfig
from serving.end_to_end import EndToEndFreshness
from serving.microbatch import BatcherConfig, MicroBatcher
from serving.pb import SERVICE_NAME, pb2
from serving.recommender import RecommenderService
from serving.rpc_guard import request_parser, wrong_role_handler
from serving.scoring import ItemSource, ServingModel

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "StaticModelSource", "RecommendServer", "steady_gc"]


def steady_gc() -> None:
    """Call once in a serving (or load-generating) process when what it keeps is loaded.

    A full collection walks every tracked object, and with torch, grpc and numpy loaded that
    stalls the whole process for tens of milliseconds: a p99 killer (closed loop of 64 clients:
    p99 96 ms -> 36 ms with this). ``gc.freeze`` takes everything alive now out of the
    collector's view, and rarer young collections keep full ones rare. Cycles created later are
    still collected; only what exists now is exempt.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class ModelSource(Protocol):
    """Where the server gets the model it scores with (a ParamServer, or a fixed model)."""

    @property
    def ready(self) -> bool: ...

    def current(self) -> ServingModel | None: ...

    def freshness_lag_ms(self) -> int: ...


@dataclass
class StaticModelSource:
    """A model loaded once (benchmarks, offline use); ``set`` swaps it atomically."""

    model: ServingModel | None = None

    @property
    def ready(self) -> bool:
        return self.model is not None

    def current(self) -> ServingModel | None:
        return self.model

    def set(self, model: ServingModel) -> None:
        self.model = model

    def freshness_lag_ms(self) -> int:
        if self.model is None or self.model.watermark_ms < 0:
            return -1
        return max(int(time.time() * 1000) - self.model.watermark_ms, 0)


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks exempt)."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got_b, self._want):
            return handler
        return _deny(handler)


def _deny(handler: Any) -> Any:
    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)


def _serialize(response: Any) -> bytes:
    """A response message, or one a handler already encoded (``serving.response_wire``)."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def _add_recommender(service: RecommenderService, server: Any) -> None:
    """Registers ``headwater.v1.Recommender`` from the .proto's descriptor, as the generated
    ``add_RecommenderServicer_to_server`` does, except that a handler may return bytes."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(service, method.name),
            request_deserializer=request_parser(getattr(pb2, method.input_type.name)),  # junk: INVALID_ARGUMENT
            response_serializer=_serialize)
        for method in pb2.DESCRIPTOR.services_by_name["Recommender"].methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class RecommendServer:
    """Owns the gRPC server (and its event loop thread), the micro-batcher and the health monitor.

    ``items``: an item catalog (``serving.item_catalog.ItemCatalog``, started and stopped by its
    owner) that fills candidates' item-side features; None scores with the request's alone.
    """

    def __init__(self, cfg: ServeConfig, source: ModelSource, items: ItemSource | None = None,
                 rerank: Any = None, history: Any = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.source = source
        self.items = items
        self.calibrator = Calibrator(cfg.negative_sample_rate)
        self.batcher: MicroBatcher | None = None
        self.pool = futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="serve")
        self.service = RecommenderService(cfg, source, self.calibrator, pool=self.pool, items=items)
        if rerank is not None:  # a serving.runtime.LlmRuntime's stage and arbiter (``serve --llm``)
            self.service.rerank, self.service.arbiter = rerank.stage, rerank.arbiter
        self.service.history = history  # a serving.user_history.UserHistory (fills recent_items)
        if cfg.batching:
            self.batcher = MicroBatcher(self.service.forward_jobs, BatcherConfig(
                cfg.max_batch_rows, cfg.max_wait_ms, cfg.max_queue), on_batch=self._on_batch,
                arbiter=self.service.arbiter)
            self.service.batcher = self.batcher
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="serve-loop", daemon=True)
        self._loop_thread.start()
        self._serving = False
        self.degraded = False
        try:
            self._call(self._build())
        except BaseException:
            self._close_loop()
            self.pool.shutdown(wait=False)
            if self.batcher is not None:
                self.batcher.close()
            raise
        if self.port == 0:
            self.stop(0)
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        self._stop = threading.Event()
        self.end_to_end = EndToEndFreshness(horizon=600)  # once a second: the last 10 minutes
        self._monitor = threading.Thread(target=self._watch, name="serve-monitor", daemon=True)

    def _call(self, coro: Awaitable[Any], timeout: float | None = 30.0) -> Any:
        """Run ``coro`` on the server's loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self) -> None:
        cfg = self.cfg
        interceptors = [_AuthInterceptor(cfg.auth_token)] if cfg.auth_token else []
        self.server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
                                      options=[("grpc.so_reuseport", 1 if cfg.reuse_port else 0)])
        _add_recommender(self.service, self.server)
        self.server.add_generic_rpc_handlers((wrong_role_handler(
            "ParameterServer", f"this process is a recommender (--role {cfg.role}); "
            "headwater.v1.ParameterServer calls go to the --role ps shards", aio=True),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        await self._set_health_async(False)
        try:
            self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError:  # grpc.aio raises where the threaded server returned 0
            self.port = 0

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> "RecommendServer":
        self._call(self.server.start())
        self._monitor.start()
        log.info("serving headwater.v1.Recommender on %s", self.address)
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if self.loop.is_running():
            try:
                self._call(self.server.stop(grace_s), timeout=grace_s + 10)
            except (futures.TimeoutError, RuntimeError):
                log.warning("gRPC server did not stop in time")
        if self.batcher is not None:
            self.batcher.close()
        monitor = getattr(self, "_monitor", None)
        if monitor is not None and monitor.is_alive():
            monitor.join(timeout=2)
        self._close_loop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _close_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()

    async def _set_health_async(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _set_health(self, serving: bool) -> None:
        self._call(self._set_health_async(serving), timeout=5.0)

    def _on_batch(self, jobs: int, rows: int) -> None:
        m.BATCH_REQUESTS.observe(jobs)
        m.BATCH_ROWS.observe(rows)

    def _watch(self) -> None:
        sampled = 0.0
        m.FRESHNESS_LAG.set(-1.0)  # nothing applied yet: not a lag of 0 (readers skip negatives)
        while not self._stop.wait(0.05):
            ready = bool(self.source.ready)
            if ready != self._serving:
                try:
                    self._set_health(ready)
                except (futures.TimeoutError, RuntimeError):
                    if self._stop.is_set():
                        return
                    raise
                self._serving = ready
                log.info("health: %s", "SERVING" if ready else "NOT_SERVING")
            model = self.source.current() if ready else None
            if model is not None:
                m.MODEL_VERSION.set(model.version)
                lag = self.source.freshness_lag_ms()
                if lag >= 0:
                    m.FRESHNESS_LAG.set(lag / 1000.0)
                    if time.monotonic() - sampled >= 1.0:  # end-to-end freshness: one sample a second
                        sampled = time.monotonic()
                        self.end_to_end.add(lag / 1000.0)
                        q = self.end_to_end.quantiles()
                        m.END_TO_END.labels("0.5").set(q["end_to_end_p50_s"])
                        m.END_TO_END.labels("0.99").set(q["end_to_end_p99_s"])
            age = getattr(self.source, "params_age_s", None)
            if age is not None:
                age_s = age()
                m.PARAMS_AGE.set(age_s)
                degraded = ready and age_s > self.cfg.stale_after_s
                if degraded != self.degraded:
                    self.degraded = degraded
                    log.warning("model %s (no hw.params update for %.1f s)",
                                "stale: degraded" if degraded else "fresh again", age_s)
                m.DEGRADED.set(1.0 if degraded else 0.0)
            if self.batcher is not None:
                m.QUEUE_JOBS.set(len(self.batcher.queue))
