"""``headwater.v1.ParameterServer``: one shard's embedding rows served over gRPC.

A ``headwater serve --role ps --shard i/N`` process runs a :class:`~serving.param_server.ParamServer`
on its own ``hw.params`` partition and this server in front of it. ``Lookup`` answers the rows of
many ids of several slots in one call, as raw float32 bytes (one ``np.frombuffer`` on the client,
no per-float protobuf decoding); with ``with_known`` it also says which ids the shard holds a row
for (``GetEmbeddings``' ``known``). ``Retrieve`` is retrieval on the shard: the top k of its own
items by dot product with a query, from an :class:`~serving.retrieval.ItemIndex` over the shard's
table, so a recommender over the fleet merges N short lists instead of copying every item row.
Health reports NOT_SERVING until the shard loaded a snapshot, so a StatefulSet's readiness probe
keeps traffic away from a shard that has no rows yet. ``headwater.v1.Recommender`` calls sent here
get UNIMPLEMENTED naming the role that serves them; junk bytes get INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from serving.param_server import ParamServer
from serving.pb import pb2, pb2_grpc
from serving.retrieval import ItemIndex
from serving.rpc_guard import MalformedRequest, request_parser, wrong_role_handler

log = logging.getLogger(__name__)

__all__ = ["PS_SERVICE_NAME", "PsServerConfig", "ParameterServerService", "PsServer"]

PS_SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ParameterServer"].full_name
LOOKUPS = Counter("hw_serve_ps_lookups", "ParameterServer.Lookup calls answered by this shard", ["code"])
RETRIEVES = Counter("hw_serve_ps_retrieves", "ParameterServer.Retrieve calls answered by this shard", ["code"])
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
    max_retrieve_k: int = 10_000  # items one Retrieve may ask for


class _Refused(Exception):
    """A call answered with a status code other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _counted(counter: Counter):
    """Counts one handler's calls by code and maps :class:`_Refused` (and bugs) to their codes."""

    def wrap(fn):
        @functools.wraps(fn)
        def handler(self, request, context):
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, MalformedRequest):
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return fn(self, request, context)
            except _Refused as exc:
                code, msg = exc.code, str(exc)
            except Exception:
                log.exception("%s failed", fn.__name__)
                code, msg = grpc.StatusCode.INTERNAL, f"{fn.__name__} failed; see the shard's log"
            finally:
                counter.labels(code=code.name).inc()
            context.abort(code, msg)

        return handler

    return wrap


class ParameterServerService(pb2_grpc.ParameterServerServicer):
    """Answers ``Lookup`` from the shard replica's current table (unknown ids: the default row)
    and ``Retrieve`` from an item index per slot kept in step with that table."""

    def __init__(self, ps: ParamServer, max_ids: int = 1 << 20, max_retrieve_k: int = 10_000) -> None:
        self.ps = ps
        self.max_ids = max_ids
        self.max_retrieve_k = max_retrieve_k
        self._indexes: dict[str, ItemIndex] = {}
        self._indexes_lock = threading.Lock()

    def _model(self) -> Any:
        model = self.ps.current()
        if model is None:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "this shard has not loaded a snapshot yet")
        return model

    @_counted(LOOKUPS)
    def Lookup(self, request, context):
        t0 = time.perf_counter()
        try:
            model = self._model()
            total = sum(len(f.ids) for f in request.slots)
            if total > self.max_ids:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{total} ids in one Lookup; the limit is {self.max_ids}")
            table = model.table
            resp = pb2.LookupResponse(version=model.version, watermark_ms=model.watermark_ms,
                                      shard_index=self.ps.cfg.shard_index, num_shards=self.ps.cfg.num_shards)
            queries = []
            for i, f in enumerate(request.slots):
                if f.slot not in table.slots:
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"slots[{i}]: unknown slot {f.slot!r}; the model has {sorted(table.slots)}")
                queries.append((f.slot, np.asarray(f.ids, dtype=np.int64), None))
            for (slot, ids, _), vecs in zip(queries, table.lookup_many(queries)):  # one GIL release for all
                known = np.isin(ids, table.ids(slot)).astype(np.uint8).tobytes() if request.with_known else b""
                if vecs.device.type != "cpu":  # a replica on a GPU (no torch call on the CPU path)
                    vecs = vecs.cpu()
                resp.slots.add(slot=slot, dim=int(vecs.shape[1]), known=known,
                               values=np.ascontiguousarray(vecs.numpy(), dtype="<f4").tobytes())
            LOOKUP_IDS.inc(total)
            return resp
        finally:
            LOOKUP_LATENCY.observe(time.perf_counter() - t0)

    @_counted(RETRIEVES)
    def Retrieve(self, request, context):
        model = self._model()
        table = model.table
        if request.slot not in table.slots:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"slot: unknown slot {request.slot!r}; the model has {sorted(table.slots)}")
        dim = int(table.slots[request.slot].dim)
        query = np.asarray(request.query, dtype=np.float32)
        if query.size != dim or not np.isfinite(query).all():
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"query: expected {dim} finite values, got {query.size}")
        if not 0 < request.k <= self.max_retrieve_k:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"k: must be in [1, {self.max_retrieve_k}], got {request.k}")
        index = self._index(request.slot)
        index.sync(table)
        ids, scores = index.topk(torch.from_numpy(query), int(request.k))
        order = np.lexsort((ids, -scores))  # score desc, then id asc: the same order on every shard
        return pb2.RetrieveResponse(ids=ids[order].tolist(), scores=scores[order].tolist(),
                                    version=model.version, watermark_ms=model.watermark_ms,
                                    shard_index=self.ps.cfg.shard_index, num_shards=self.ps.cfg.num_shards)

    def _index(self, slot: str) -> ItemIndex:
        with self._indexes_lock:
            index = self._indexes.get(slot)
            if index is None:
                index = self._indexes[slot] = ItemIndex(slot)
            return index


def _add_parameter_server(service: ParameterServerService, server: Any) -> None:
    """Registers ``headwater.v1.ParameterServer`` as the generated ``add_..._to_server`` does, except
    that junk request bytes reach the handler as a :class:`MalformedRequest` (INVALID_ARGUMENT)."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(service, method.name),
            request_deserializer=request_parser(getattr(pb2, method.input_type.name)),
            response_serializer=getattr(pb2, method.output_type.name).SerializeToString)
        for method in pb2.DESCRIPTOR.services_by_name["ParameterServer"].methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PS_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(PS_SERVICE_NAME, handlers)


class PsServer:
    """A shard's gRPC server: ``ParameterServer`` plus health and reflection."""

    def __init__(self, ps: ParamServer, cfg: PsServerConfig | None = None) -> None:
        self.cfg = cfg or PsServerConfig()
        self.ps = ps
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.cfg.workers,
                                                             thread_name_prefix="ps-grpc"))
        _add_parameter_server(ParameterServerService(ps, self.cfg.max_ids, self.cfg.max_retrieve_k), self.server)
        shard = f"{ps.cfg.shard_index}/{ps.cfg.num_shards}"
        self.server.add_generic_rpc_handlers((wrong_role_handler(
            "Recommender", f"this process is parameter-server shard {shard} (--role ps), which serves "
            f"{PS_SERVICE_NAME} only; send headwater.v1.Recommender calls to a --role recommender "
            f"or --role all process", aio=False),))
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
