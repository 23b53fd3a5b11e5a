"""``headwater bench serving --json``: Recommend throughput and latency, batched vs naive.

Each mode is ``--processes`` server processes on one port (``SO_REUSEPORT``, as
``headwater serve --processes`` runs them), each holding the same loaded model (random weights,
``--items`` item rows) and answering ``Recommend`` with ``--candidates`` candidates per call. In
one mode every process micro-batches its concurrent calls into one model forward; the naive
baseline runs the same server code with batching off, i.e. one model forward per call on the
handler thread. Both modes get the same process count. A separate process, the load generator
(:mod:`serving.loadgen`: pre-serialized requests, identity serializers, ``grpc.aio``,
``--connections`` HTTP/2 connections), runs a closed loop of C concurrent clients over loopback
for ``--duration-s`` seconds (after ``--warmup-s``), for each C in ``--clients``.

On a shared machine the two modes are measured interleaved: for each C, ``--repeats`` (or
``--rounds``) rounds of batched then baseline (the order flips every round: A/B, B/A, ...), and
each figure of a point is the median over its rounds. The JSON line has every point and, at top
level, the highest-QPS batched point whose p99 is within ``--p99-budget-ms`` and its speedup over
the best baseline point within the same budget, plus the machine's load average before and after.

Ceiling (``ceiling_ms_per_call``, next to ``server_cpu_ms_per_call``): the CPU time of the
tower's forward alone (the very function the server runs, same precision and threads, in a
server process of the run) on the batch shapes the batched server formed at that point (calls
per forward from its ``hw_serve_batch_requests`` histogram, times ``--candidates`` rows), per
call. Everything else a call costs (lookups, gRPC, protobuf, top-k) is the distance to it;
``fraction_of_ceiling`` = ceiling / server CPU per call. ``baseline_ceiling_ms_per_call`` is the
same for one call per forward. The forward's figure is the least of 50 runs: what the machine can do.

Where the rest goes, per point: ``forward_cpu_ms_per_call``, the batched server's forward thread
CPU inside its forwards (read, tower, calibration) per call while the load runs, against the
ceiling's idle figure; ``grpc_floor_ms_per_call``, the server CPU per call of the same gRPC stack
(``grpc.aio``, the same request parsing) answering every call with a fixed ten-item response,
under the same load (one round per point): what a call costs before any of our code runs.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import statistics
import time
from typing import Any, Callable

from bench.harness import Ceiling, add_common, with_ceiling
from serving.loadgen import LoadSpec, recv_json, send_json, serve_commands, spec_dict

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", default="1,4,8,16,24,32,48,64", help="concurrent clients, comma list")
    p.add_argument("--duration-s", type=float, default=2.0, help="measured seconds per point and round")
    p.add_argument("--warmup-s", type=float, default=0.5, help="unmeasured seconds before each round")
    p.add_argument("--candidates", type=int, default=200, help="candidate items per Recommend")
    p.add_argument("--top-k", type=int, default=10, help="items returned per call")
    p.add_argument("--items", type=int, default=100_000, help="item rows in the table")
    p.add_argument("--p99-budget-ms", type=float, default=25.0, help="latency budget for the headline")
    p.add_argument("--max-wait-ms", type=float, default=0.5, help="micro-batcher wait for company")
    p.add_argument("--max-batch-rows", type=int, default=8192, help="row budget of one batched forward")
    p.add_argument("--workers", type=int, default=0, help="gRPC handler threads of both servers (0 = ServeConfig's default)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads in the server")
    p.add_argument("--precision", default="auto", help="tower precision of both servers: auto, float32, bfloat16")
    p.add_argument("--dim", type=int, default=16, help="embedding dim of the model's 4 slots")
    p.add_argument("--hidden", default="256,128,64", help="the tower's MLP widths, comma list")
    p.add_argument("--processes", type=int, default=1,
                   help="server processes per mode on one port, as serve --processes (both modes alike)")
    p.add_argument("--connections", type=int, default=16,
                   help="HTTP/2 connections the clients spread over (at most one per client)")
    add_common(p, repeats=3, repeats_aliases=("--rounds",),
               repeats_help="interleaved batched/baseline rounds per point (medians)",
               seed_help="seed of the model's weights and the load's requests (+ clients)")


def _serve_child(conn: Any, batching: bool, items: int, max_wait_ms: float, max_batch_rows: int,
                 torch_threads: int, precision: str, workers: int, dim: int, hidden: list[int], seed: int = 0,
                 port: int = 0, reuse_port: bool = False) -> None:
    import torch

    from serving.config import ServeConfig
    from serving.server import RecommendServer, StaticModelSource, steady_gc
    from serving.testing import random_model

    torch.set_num_threads(torch_threads)
    model = random_model(slots=("user_id", "item_id", "f00", "f01"), items=items, users=items, dim=dim,
                         hidden=tuple(hidden), seed=seed)
    cfg = ServeConfig(port=port, reuse_port=reuse_port, batching=batching, max_wait_ms=max_wait_ms,
                      max_batch_rows=max_batch_rows, max_queue=1024, precision=precision)
    if workers > 0:
        cfg.workers = workers
    server = RecommendServer(cfg, StaticModelSource(model)).start()
    forward_cpu = _time_forwards(server)
    steady_gc()  # as `headwater serve` does
    send_json(conn, server.address)
    # "cpu" -> this process's CPU seconds so far; "batches" -> [forwards, calls] batched so far;
    # "forward_cpu" -> CPU seconds spent inside batched forwards so far;
    # {"forward_rows": n} -> CPU ms of the tower's forward alone on n rows; else (or EOF) -> stop.
    while True:
        try:
            msg = recv_json(conn)
        except EOFError:
            break
        if msg == "cpu":
            send_json(conn, time.process_time())
        elif msg == "batches":
            send_json(conn, _batch_counts())
        elif msg == "forward_cpu":
            send_json(conn, forward_cpu[0])
        elif isinstance(msg, dict) and "forward_rows" in msg:
            send_json(conn, _forward_cpu_ms(model, server.service.bf16, msg["forward_rows"], msg.get("repeats", 50)))
        else:
            break
    server.stop(0.5)


def _time_forwards(server: Any) -> list[float]:
    """Wraps the batcher's forward to sum its thread CPU seconds (into the returned one-item list;
    stays 0 without batching): the forward's cost in situ, beside the loop's work and the load."""
    total = [0.0]
    batcher = server.batcher
    if batcher is None:
        return total
    forward = batcher.forward

    def timed(payloads: list) -> Any:
        c0 = time.thread_time()
        try:
            return forward(payloads)
        finally:
            total[0] += time.thread_time() - c0

    batcher.forward = timed
    return total


def _floor_child(conn: Any, top_k: int) -> None:
    """A ``grpc.aio`` server registering Recommend as ``RecommendServer`` does (the same request
    parser, a bytes response) whose handler answers at once with a fixed ``top_k``-item response:
    the gRPC stack's own CPU per call. Answers "cpu" like :func:`_serve_child`."""
    import asyncio
    import threading

    import grpc
    import numpy as np

    from serving.pb import SERVICE_NAME, pb2
    from serving.response_wire import encode_recommend_response
    from serving.rpc_guard import request_parser
    from serving.server import steady_gc

    response = encode_recommend_response(np.arange(1, top_k + 1), np.full(top_k, 0.5, np.float32),
                                         model_version=1, model_id="ctr", freshness_lag_ms=0)

    async def recommend(request: Any, context: Any) -> bytes:
        return response

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server(maximum_concurrent_rpcs=1024)
        handler = grpc.unary_unary_rpc_method_handler(
            recommend, request_deserializer=request_parser(pb2.RecommendRequest), response_serializer=bytes)
        handlers = {"Recommend": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="floor-loop", daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    steady_gc()
    send_json(conn, f"127.0.0.1:{port}")
    while True:
        try:
            msg = recv_json(conn)
        except EOFError:
            break
        if msg != "cpu":
            break
        send_json(conn, time.process_time())
    asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


def _batch_counts() -> list[float]:
    """[model forwards, calls merged into them] of this process so far (the batcher's histogram)."""
    from serving import metrics as m

    got = {s.name: s.value for metric in m.BATCH_REQUESTS.collect() for s in metric.samples}
    return [got.get("hw_serve_batch_requests_count", 0.0), got.get("hw_serve_batch_requests_sum", 0.0)]


def _forward_cpu_ms(model: Any, bf16: bool, rows: int, repeats: int) -> float:
    """Least CPU ms of the tower's forward alone on ``rows`` rows over ``repeats`` runs (a ceiling
    is what the machine can do: the least disturbed run): the function the server's forward runs
    (traced tower, the server's precision), fed random embeddings."""
    import torch

    from serving.compiled_forward import tower_logits  # the server's own forward, on purpose

    cfg = model.tower.cfg
    emb = torch.randn(rows, len(cfg.slots), cfg.embedding_dim)
    dense = torch.zeros(rows, cfg.dense_dim) if cfg.dense_dim else None
    for _ in range(3):  # warm-up: tracing, allocations
        tower_logits(model, emb, dense, bf16)
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        tower_logits(model, emb, dense, bf16)
        times.append(time.process_time() - c0)
    return min(times) * 1000.0


class _Child:
    """A spawned helper process spoken to with JSON over a pipe."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            self.close()
            raise RuntimeError(f"bench helper {target.__name__} did not start")
        self.hello = recv_json(self.conn)

    def ask(self, msg: Any) -> Any:
        send_json(self.conn, msg)
        return recv_json(self.conn)

    def close(self) -> None:
        try:
            send_json(self.conn, "stop")
        except OSError:
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=5)


def _round(servers: list[_Child], load: _Child, spec: LoadSpec, forwards: bool = False) -> dict:
    """One measured point; ``forwards``: also the servers' CPU inside batched forwards per call."""
    cpu0 = sum(s.ask("cpu") for s in servers)
    fwd0 = sum(s.ask("forward_cpu") for s in servers) if forwards else 0.0
    point = load.ask(spec_dict(spec))
    # Server CPU per answered call, all processes (warm-up included in both): robust to a shared box.
    cpu = sum(s.ask("cpu") for s in servers) - cpu0
    point["server_cpu_ms_per_call"] = cpu * 1000.0 / max(point["calls"], 1)
    if forwards:
        fwd = sum(s.ask("forward_cpu") for s in servers) - fwd0
        point["forward_cpu_ms_per_call"] = fwd * 1000.0 / max(point["calls"], 1)
    return point


def _calls_per_forward(servers: list[_Child], before: list[list[float]]) -> float:
    """Calls per model forward in ``servers`` since ``before`` (their "batches" answers)."""
    after = [s.ask("batches") for s in servers]
    forwards = sum(a[0] - b[0] for a, b in zip(after, before))
    calls = sum(a[1] - b[1] for a, b in zip(after, before))
    return max(calls / forwards, 1.0) if forwards > 0 else 1.0


def _start_servers(n: int, *args: Any) -> tuple[list[_Child], Any]:
    """``n`` server processes on one port: a reserved port and SO_REUSEPORT when ``n`` > 1."""
    if n <= 1:
        return [_Child(_serve_child, *args)], None
    from serving.processes import reserve_port

    sock = reserve_port("127.0.0.1", 0)
    port = sock.getsockname()[1]
    return [_Child(_serve_child, *args, port, True) for _ in range(n)], sock


def _median(rounds: list[dict]) -> dict:
    keys = ("qps", "p50_ms", "p99_ms", "server_cpu_ms_per_call", "client_cpu_ms_per_call")
    keys += tuple(k for k in ("forward_cpu_ms_per_call",) if k in rounds[0])
    out = {k: statistics.median(r[k] for r in rounds) for k in keys}
    out["clients"] = rounds[0]["clients"]
    out["errors"] = sum(r["errors"] for r in rounds)
    return out


def _ceiling_ms(server: _Child, calls: float, candidates: int, measured: dict[int, float]) -> float:
    """The tower's forward alone on ``calls`` calls' rows, per call (CPU ms); ``measured`` keeps
    each row count's figure, so equal shapes get one figure."""
    rows = max(1, round(calls * candidates))
    if rows not in measured:
        measured[rows] = server.ask({"forward_rows": rows})
    return measured[rows] / calls


def _best(points: list[dict], budget_ms: float) -> dict | None:
    ok = [p for p in points if p["p99_ms"] <= budget_ms]
    return max(ok, key=lambda p: p["qps"]) if ok else None


def run(args: argparse.Namespace) -> dict:
    from rich.console import Console

    console = Console(stderr=True)
    clients = [int(c) for c in str(args.clients).split(",") if c]
    load_start = os.getloadavg()

    def progress(mode: str, r: int, p: dict) -> None:
        console.print(f"[bold]{mode:>8}[/] C={p['clients']:>3} round {r}: {p['qps']:7.1f} qps"
                      f"  p50 {p['p50_ms']:6.2f} ms  p99 {p['p99_ms']:6.2f} ms"
                      f"  server CPU {p['server_cpu_ms_per_call']:.3f} ms/call"
                      f"  client CPU {p['client_cpu_ms_per_call']:.3f} ms/call  errors {p['errors']}")

    children: list[_Child] = []
    sockets: list[Any] = []
    servers: dict[str, list[_Child]] = {}
    try:
        for mode, batching in (("batched", True), ("baseline", False)):
            servers[mode], sock = _start_servers(
                args.processes, batching, args.items, args.max_wait_ms, args.max_batch_rows, args.torch_threads,
                args.precision,
                args.workers, args.dim, [int(h) for h in str(args.hidden).split(",") if h], args.seed)
            children += servers[mode]
            sockets += [sock] if sock is not None else []
        floor = _Child(_floor_child, args.top_k)
        children.append(floor)
        load = _Child(serve_commands)
        children.append(load)
        batched, baseline = [], []
        forward_ms: dict[int, float] = {}  # rows -> CPU ms of the tower's forward alone
        for c in clients:
            per_mode: dict[str, list[dict]] = {"batched": [], "baseline": []}
            counts = [s.ask("batches") for s in servers["batched"]]
            for r in range(max(args.repeats, 1)):
                order = ("batched", "baseline") if r % 2 == 0 else ("baseline", "batched")
                for mode in order:
                    spec = LoadSpec(servers[mode][0].hello, c, args.duration_s, args.warmup_s,
                                    args.candidates, args.top_k, args.items, seed=args.seed + c,
                                    connections=args.connections)
                    point = _round(servers[mode], load, spec, forwards=mode == "batched")
                    progress(mode, r, point)
                    per_mode[mode].append(point)
            floor_point = _round([floor], load, LoadSpec(floor.hello, c, args.duration_s, args.warmup_s,
                                                         args.candidates, args.top_k, args.items, seed=args.seed + c,
                                                         connections=args.connections))
            batched.append(_median(per_mode["batched"]))
            batched[-1]["grpc_floor_ms_per_call"] = floor_point["server_cpu_ms_per_call"]
            baseline.append(_median(per_mode["baseline"]))
            calls = _calls_per_forward(servers["batched"], counts)
            batched[-1].update(calls_per_forward=calls, ceiling_ms_per_call=_ceiling_ms(
                servers["batched"][0], calls, args.candidates, forward_ms))
        base_ceiling = _ceiling_ms(servers["batched"][0], 1.0, args.candidates, forward_ms)
    finally:
        for child in children:
            child.close()
        for sock in sockets:
            sock.close()
    points = [{"clients": b["clients"], "qps": round(b["qps"], 1), "p50_ms": round(b["p50_ms"], 2),
               "p99_ms": round(b["p99_ms"], 2), "errors": b["errors"],
               "server_cpu_ms_per_call": round(b["server_cpu_ms_per_call"], 3),
               "client_cpu_ms_per_call": round(b["client_cpu_ms_per_call"], 3),
               "baseline_server_cpu_ms_per_call": round(n["server_cpu_ms_per_call"], 3),
               "baseline_qps": round(n["qps"], 1), "baseline_p50_ms": round(n["p50_ms"], 2),
               "baseline_p99_ms": round(n["p99_ms"], 2), "baseline_errors": n["errors"],
               "calls_per_forward": round(b["calls_per_forward"], 2),
               "ceiling_ms_per_call": round(b["ceiling_ms_per_call"], 3),
               "baseline_ceiling_ms_per_call": round(base_ceiling, 3),
               "forward_cpu_ms_per_call": round(b["forward_cpu_ms_per_call"], 3),
               "grpc_floor_ms_per_call": round(b["grpc_floor_ms_per_call"], 3)}
              for b, n in zip(batched, baseline)]
    best, best_base = _best(batched, args.p99_budget_ms), _best(baseline, args.p99_budget_ms)
    ceiling = Ceiling(best["ceiling_ms_per_call"] if best else None, "ms/call", lower_is_better=True,
                      measured=best["server_cpu_ms_per_call"] if best else None, note=(
                          "CPU time of the tower's forward alone (the server's own traced forward, "
                          "same precision and threads) on the batch shapes the batched server formed at "
                          "the headline point, per call; against server_cpu_ms_per_call"))
    return with_ceiling({
        "bench": "serving", "candidates": args.candidates, "top_k": args.top_k,
        "model": {"slots": 4, "dim": args.dim, "hidden": args.hidden},
        "duration_s": args.duration_s, "rounds": args.repeats, "precision": args.precision,
        "p99_budget_ms": args.p99_budget_ms, "cpus": os.cpu_count(),
        "processes": args.processes, "connections": args.connections,
        "loadavg_start": round(load_start[0], 2), "loadavg_end": round(os.getloadavg()[0], 2),
        "points": points,
        "clients": best["clients"] if best else None,
        "qps": round(best["qps"], 1) if best else 0.0,
        "p50_ms": round(best["p50_ms"], 2) if best else None,
        "p99_ms": round(best["p99_ms"], 2) if best else None,
        "baseline_clients": best_base["clients"] if best_base else None,
        "baseline_qps": round(best_base["qps"], 1) if best_base else 0.0,
        "speedup_vs_baseline": (round(best["qps"] / best_base["qps"], 2) if best and best_base else None),
        # Server CPU per call at those two points: the same comparison, insensitive to other
        # load on a shared machine.
        "server_cpu_ms_per_call": round(best["server_cpu_ms_per_call"], 3) if best else None,
        "baseline_server_cpu_ms_per_call": (round(best_base["server_cpu_ms_per_call"], 3)
                                            if best_base else None),
        "calls_per_forward": round(best["calls_per_forward"], 2) if best else None,
        # Where the server's CPU per call goes at the headline point (see the module docstring).
        "forward_cpu_ms_per_call": round(best["forward_cpu_ms_per_call"], 3) if best else None,
        "grpc_floor_ms_per_call": round(best["grpc_floor_ms_per_call"], 3) if best else None,
        "baseline_ceiling_ms_per_call": round(base_ceiling, 3), "seed": args.seed,
    }, ceiling, named="ceiling_ms_per_call")
