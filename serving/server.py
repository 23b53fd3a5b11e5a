"""The gRPC server: ``headwater.v1.Recommender`` plus standard health and reflection services.

Health reports NOT_SERVING until the model source has a model (a parameter server that loaded a
snapshot); a monitor thread flips it and keeps the version / freshness gauges current. A model
with no hw.params update for ``stale_after_s`` (the trainer is down) is *degraded*, not
unhealthy: gRPC health stays SERVING (a stale model beats no answer) and ``/metrics`` shows
``hw_serve_degraded 1`` with ``hw_serve_params_age_seconds``. Auth, when
a token is configured, is checked by an interceptor in constant time; the health service stays
open so that probes work without credentials.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import metrics as m
from serving.calibration import Calibrator
from serving.config import ServeConfig
from serving.microbatch import BatcherConfig, MicroBatcher
from serving.pb import SERVICE_NAME, pb2_grpc
from serving.recommender import RecommenderService
from serving.scoring import ServingModel

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "StaticModelSource", "RecommendServer"]


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


class _AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks exempt)."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got_b, self._want):
            return handler
        return _deny(handler)


def _deny(handler: Any) -> Any:
    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort, **kw)


class RecommendServer:
    """Owns the gRPC server, the micro-batcher and the health monitor for one model source."""

    def __init__(self, cfg: ServeConfig, source: ModelSource) -> None:
        cfg.validate()
        self.cfg = cfg
        self.source = source
        self.calibrator = Calibrator(cfg.negative_sample_rate)
        self.batcher: MicroBatcher | None = None
        self.service = RecommenderService(cfg, source, self.calibrator)
        if cfg.batching:
            self.batcher = MicroBatcher(self.service.forward_jobs, BatcherConfig(
                cfg.max_batch_rows, cfg.max_wait_ms, cfg.max_queue), on_batch=self._on_batch)
            self.service.batcher = self.batcher
        interceptors = [_AuthInterceptor(cfg.auth_token)] if cfg.auth_token else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="grpc"),
                                  interceptors=interceptors, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        pb2_grpc.add_RecommenderServicer_to_server(self.service, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self._set_health(False)
        self._serving = False
        self.degraded = False
        self.port = self.server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="serve-monitor", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> "RecommendServer":
        self.server.start()
        self._monitor.start()
        log.info("serving headwater.v1.Recommender on %s", self.address)
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        self.server.stop(grace_s).wait()
        if self.batcher is not None:
            self.batcher.close()
        if self._monitor.is_alive():
            self._monitor.join(timeout=2)

    def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _on_batch(self, jobs: int, rows: int) -> None:
        m.BATCH_REQUESTS.observe(jobs)
        m.BATCH_ROWS.observe(rows)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            ready = bool(self.source.ready)
            if ready != self._serving:
                self._serving = ready
                self._set_health(ready)
                log.info("health: %s", "SERVING" if ready else "NOT_SERVING")
            model = self.source.current() if ready else None
            if model is not None:
                m.MODEL_VERSION.set(model.version)
                lag = self.source.freshness_lag_ms()
                if lag >= 0:
                    m.FRESHNESS_LAG.set(lag / 1000.0)
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
