"""A cheap closed-loop ``Recommend`` load generator for benchmarks, run in its own process.

On a small shared box the client's CPU competes with the server it measures, so the client must
cost as little per call as possible and must not share the server's GIL. Hence:

- it runs in a separate (spawned) process that serves commands over a pipe;
- requests are serialized once up front (a pool of 64 distinct calls, cycled) and sent as bytes
  through a *generic* unary call with identity serializers; responses are not parsed either
  (only their gRPC status counts);
- C clients are C coroutines on ``min(C, connections)`` ``grpc.aio`` channels (one HTTP/2
  connection each; client i uses channel i mod n), each sending its next call as soon as the
  previous one returns (a closed loop). Several connections are what lets ``SO_REUSEPORT`` spread
  the load over several serving processes: the kernel balances connections, not calls.

Latencies are taken around each call; calls that start inside the warm-up are not recorded.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["LoadSpec", "request_pool", "closed_loop", "serve_commands", "send_json", "recv_json", "spec_dict"]

RECOMMEND_METHOD = "/headwater.v1.Recommender/Recommend"


@dataclass(frozen=True)
class LoadSpec:
    """One measured point: C clients for ``duration_s`` after ``warmup_s``."""

    address: str
    clients: int
    duration_s: float
    warmup_s: float
    candidates: int = 200
    top_k: int = 10
    items: int = 100_000
    seed: int = 0
    connections: int = 1


def request_pool(candidates: int, top_k: int, items: int, seed: int, size: int = 64) -> list[bytes]:
    """``size`` serialized ``RecommendRequest``s: random users, distinct random candidates."""
    from serving.pb import pb2

    rng = np.random.default_rng(seed)
    return [pb2.RecommendRequest(user_id=int(u), top_k=top_k,
                                 candidate_item_ids=rng.choice(items, candidates, replace=False).tolist(),
                                 context=[pb2.SparseFeature(slot="f00", ids=[int(u) % 97])]).SerializeToString()
            for u in rng.integers(0, items, size)]


async def closed_loop(spec: LoadSpec) -> dict[str, float]:
    """Run one point; returns qps, p50_ms, p99_ms, calls (warm-up included), errors, client CPU."""
    import grpc

    pool = request_pool(spec.candidates, spec.top_k, spec.items, spec.seed)
    lat: list[float] = []
    errors = calls = 0
    # A local subchannel pool per channel: otherwise channels to one target share one connection.
    channels = [grpc.aio.insecure_channel(spec.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(min(spec.clients, spec.connections), 1))]
    calls_of = [ch.unary_unary(RECOMMEND_METHOD) for ch in channels]  # no (de)serializers: bytes in, bytes out
    try:
        cpu0, t_start = time.process_time(), time.perf_counter()
        t_measure, t_end = t_start + spec.warmup_s, t_start + spec.warmup_s + spec.duration_s

        async def client(i: int) -> None:
            nonlocal errors, calls
            k, call = i, calls_of[i % len(calls_of)]
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    await call(pool[k % len(pool)], timeout=5.0)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                calls += 1
                if t0 >= t_measure:
                    lat.append(t1 - t0)
                k += spec.clients

        await asyncio.gather(*(client(i) for i in range(spec.clients)))
        cpu = time.process_time() - cpu0
    finally:
        for ch in channels:
            await ch.close()
    arr = np.array(lat) * 1000.0
    return {"clients": spec.clients, "qps": arr.size / spec.duration_s, "calls": calls,
            "p50_ms": float(np.percentile(arr, 50)) if arr.size else float("nan"),
            "p99_ms": float(np.percentile(arr, 99)) if arr.size else float("nan"),
            "errors": errors, "client_cpu_ms_per_call": cpu * 1000.0 / max(calls, 1)}


def send_json(conn: Any, obj: Any) -> None:
    """Pipe messages are JSON (never pickle across a process boundary)."""
    conn.send_bytes(json.dumps(obj).encode())


def recv_json(conn: Any) -> Any:
    return json.loads(conn.recv_bytes())


def serve_commands(conn: Any) -> None:
    """Child-process loop: receives ``LoadSpec`` fields as a JSON object, answers with the point."""
    from serving.server import steady_gc

    steady_gc()  # a collector pause here would be booked as server latency
    send_json(conn, "ready")
    while True:
        try:
            msg = recv_json(conn)
        except EOFError:
            return
        if not isinstance(msg, dict):
            return
        send_json(conn, asyncio.run(closed_loop(LoadSpec(**msg))))


def spec_dict(spec: LoadSpec) -> dict[str, Any]:
    return asdict(spec)
