"""``headwater.v1.ParameterServer``: one shard's embedding rows served over gRPC.

A ``headwater serve --role ps --shard i/N`` process runs a :class:`~serving.param_server.ParamServer`
on its own ``hw.params`` partition and this server in front of it. ``Lookup`` answers the rows of
many ids of several slots in one call, as raw float32 bytes (one ``np.frombuffer`` on the client,
no per-float protobuf decoding). Health reports NOT_SERVING until the shard loaded a snapshot, so
a StatefulSet's readiness probe keeps traffic away from a shard that has no rows yet.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from serving.param_server import ParamServer
from serving.pb import pb2, pb2_grpc

log = logging.getLogger(__name__)

__all__ = ["PS_SERVICE_NAME", "PsServerConfig", "ParameterServerService", "PsServer"]

PS_SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
LOOKUPS = Counter("hw_serve_ps_lookups", "ParameterServer.Lookup calls answered by this shard", ["code"])
LOOKUP_IDS = Counter("hw_serve_ps_lookup_ids", "ids looked up on this shard")
LOOKUP_LATENCY = Histogram("hw_serve_ps_lookup_seconds", "Lookup latency in the shard",
                           buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5))


@dataclass
class PsServerConfig:
    """Where a shard listens and how much one call may ask for."""

    host: str = "127.0.0.1"
    port: int = 0
    workers: int = 16
    max_ids: int = 1 << 20  # ids per Lookup, all slots together


class ParameterServerService(pb2_grpc.ParameterServerServicer):
    """Answers ``Lookup`` from the shard replica's current table (unknown ids: the default row)."""

    def __init__(self, ps: ParamServer, max_ids: int = 1 << 20) -> None:
        self.ps = ps
        self.max_ids = max_ids

    def Lookup(self, request, context):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            model = self.ps.current()
            if model is None:
                code = grpc.StatusCode.UNAVAILABLE
                context.abort(code, "this shard has not loaded a snapshot yet")
            total = sum(len(f.ids) for f in request.slots)
            if total > self.max_ids:
                code = grpc.StatusCode.INVALID_ARGUMENT
                context.abort(code, f"{total} ids in one Lookup; the limit is {self.max_ids}")
            table = model.table
            resp = pb2.LookupResponse(version=model.version, watermark_ms=model.watermark_ms,
                                      shard_index=self.ps.cfg.shard_index, num_shards=self.ps.cfg.num_shards)
            queries = []
            for i, f in enumerate(request.slots):
                if f.slot not in table.slots:
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    context.abort(code, f"slots[{i}]: unknown slot {f.slot!r}; the model has {sorted(table.slots)}")
                queries.append((f.slot, np.asarray(f.ids, dtype=np.int64), None))
            for (slot, _, _), vecs in zip(queries, table.lookup_many(queries)):  # one GIL release for all
                resp.slots.add(slot=slot, dim=int(vecs.shape[1]),
                               values=np.ascontiguousarray(vecs.numpy(), dtype="<f4").tobytes())
            LOOKUP_IDS.inc(total)
            return resp
        finally:
            LOOKUPS.labels(code=code.name).inc()
            LOOKUP_LATENCY.observe(time.perf_counter() - t0)


class PsServer:
    """A shard's gRPC server: ``ParameterServer`` plus health and reflection."""

    def __init__(self, ps: ParamServer, cfg: PsServerConfig | None = None) -> None:
        self.cfg = cfg or PsServerConfig()
        self.ps = ps
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.cfg.workers,
                                                             thread_name_prefix="ps-grpc"))
        pb2_grpc.add_ParameterServerServicer_to_server(ParameterServerService(ps, self.cfg.max_ids), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (PS_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self._set_health(False)
        self._serving = False
        self.port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise OSError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="ps-monitor", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> "PsServer":
        self.server.start()
        self._monitor.start()
        log.info("serving %s (shard %d/%d) on %s", PS_SERVICE_NAME, self.ps.cfg.shard_index,
                 self.ps.cfg.num_shards, self.address)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace_s).wait()
        if self._monitor.is_alive():
            self._monitor.join(timeout=2)

    def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", PS_SERVICE_NAME):
            self.health.set(name, status)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            ready = bool(self.ps.ready)
            if ready != self._serving:
                self._serving = ready
                self._set_health(ready)
                log.info("shard health: %s", "SERVING" if ready else "NOT_SERVING")
