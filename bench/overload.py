"""``headwater bench overload --json``: both servers at 3x their sustainable rate, with and
without their admission limit, in the same run.

For each server (the LLM HTTP server on a tiny random Llama, the gRPC recommender on a random
model): a closed loop at the admission limit measures the sustainable rate and service p99; then
an open loop offers 3x that rate for ``--duration-s`` to the bounded server and to the baseline
(the same server with a limit too large to matter), alternating ``--repeats`` times. The JSON
line reports, per server and mode, admitted p50/p99, refusals (and whether each carried
``Retry-After``), other failures, RSS growth, the latency bound derived from the limit, and the
load average while it ran.

No ceiling (``ceiling: null``): the bench measures behaviour past capacity, so its references are
each server's own sustainable rate (``sustainable``) and the latency bound its limit implies
(``bound_s``), both measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import add_common, add_recommend_load, no_ceiling, with_ceiling

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration-s", type=float, default=8.0, help="seconds of 3x load per phase")
    p.add_argument("--http-limit", type=int, default=4, help="LLM server: max_pending_requests")
    p.add_argument("--grpc-limit", type=int, default=8, help="gRPC server: workers = max_concurrent_rpcs = max_queue")
    p.add_argument("--max-tokens", type=int, default=160, help="tokens generated per LLM request")
    add_recommend_load(p, candidates=2000)
    p.add_argument("--model-dir", default="", help="LLM model folder (default: a tiny random Llama)")
    p.add_argument("--which", default="http,grpc", help="servers to load: http, grpc or both")
    add_common(p, repeats=2, repeats_help="bounded/baseline phase pairs per server",
               seed_help="seed of the random models")


def _phase(r: Any, rss_growth: int) -> dict:
    return {**r.summary(), "rss_growth_mib": round(rss_growth / 2**20, 1)}


def _http(args: argparse.Namespace, console: Any) -> dict:
    from llm_engine import EngineConfig
    from llm_engine.random_model import build_random_llama
    from serving.http import HttpServerConfig, create_app
    from serving.http.engine_backend import EngineBackend
    from serving.http.overload import admitted_latency_bound, rss_bytes, run_http_load
    from serving.http.server import RunningServer

    model_dir = (Path(args.model_dir) if args.model_dir
                 else build_random_llama(Path(tempfile.mkdtemp()), seed=args.seed, max_positions=512))
    backend = EngineBackend.from_model_dir(model_dir, "bench", EngineConfig(max_model_len=256, num_kv_blocks=256))
    body = {"prompt": "hello there", "max_tokens": args.max_tokens, "ignore_eos": True}
    out: dict[str, Any] = {"limit": args.http_limit, "bounded": [], "baseline": []}
    try:
        apps = {"bounded": create_app(backend, HttpServerConfig(max_pending_requests=args.http_limit)),
                "baseline": create_app(backend, HttpServerConfig(max_pending_requests=1 << 30))}
        with RunningServer(apps["bounded"]) as srv:
            closed = run_http_load(srv.url, "/v1/completions", body, "closed", args.http_limit, 3.0)
        rate = closed.achieved_rps
        out["sustainable"] = closed.summary()
        out["bound_s"] = round(admitted_latency_bound(args.http_limit, rate, closed.p(99)), 4)
        for i in range(args.repeats):
            for mode, app in apps.items():
                with RunningServer(app) as srv:
                    rss0 = rss_bytes()
                    r = run_http_load(srv.url, "/v1/completions", body, "open", 3 * rate, args.duration_s)
                    out[mode].append(_phase(r, rss_bytes() - rss0))
                console.print(f"http {mode} #{i}: p99 {r.p(99):.2f} s, {r.ok} ok, {r.rejected} refused")
    finally:
        backend.close()
    return out


def _grpc(args: argparse.Namespace, console: Any) -> dict:
    import grpc

    from serving.config import ServeConfig
    from serving.http.overload import admitted_latency_bound, closed_loop_grpc, open_loop_grpc, rss_bytes
    from serving.pb import pb2, pb2_grpc
    from serving.server import RecommendServer, StaticModelSource
    from serving.testing import random_model

    model = random_model(items=args.candidates, seed=args.seed)
    req = pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(args.candidates)))
    lim = args.grpc_limit
    cfgs = {"bounded": ServeConfig(port=0, workers=lim, max_concurrent_rpcs=lim, max_queue=lim),
            "baseline": ServeConfig(port=0, workers=lim, max_concurrent_rpcs=1 << 30, max_queue=1 << 30)}
    out: dict[str, Any] = {"limit": lim, "bounded": [], "baseline": []}

    def serve(mode: str, fn: Any) -> Any:
        server = RecommendServer(cfgs[mode], StaticModelSource(model)).start()
        try:
            with grpc.insecure_channel(server.address) as ch:
                return fn(pb2_grpc.RecommenderStub(ch).Recommend)
        finally:
            server.stop(0)

    closed = serve("bounded", lambda call: closed_loop_grpc(call, req, lim, 3.0))
    rate = closed.achieved_rps
    out["sustainable"] = closed.summary()
    out["bound_s"] = round(admitted_latency_bound(lim, rate, closed.p(99)), 4)
    for i in range(args.repeats):
        for mode in ("bounded", "baseline"):
            rss0 = rss_bytes()
            r = serve(mode, lambda call: open_loop_grpc(call, req, 3 * rate, args.duration_s))
            out[mode].append(_phase(r, rss_bytes() - rss0))
            console.print(f"grpc {mode} #{i}: p99 {r.p(99):.2f} s, {r.ok} ok, {r.rejected} refused")
    return out


def run(args: argparse.Namespace) -> dict:
    from rich.console import Console

    console = Console(stderr=True)
    which = {w.strip() for w in args.which.split(",")}
    result: dict[str, Any] = {"bench": "overload", "offered": "3x sustainable", "duration_s": args.duration_s,
                              "load_avg_start": list(os.getloadavg())}
    with console.status("overload: 3x the sustainable rate, bounded vs baseline"):
        if "http" in which:
            result["http"] = _http(args, console)
        if "grpc" in which:
            result["grpc"] = _grpc(args, console)
    result["load_avg_end"] = list(os.getloadavg())
    result["repeats"] = args.repeats
    return with_ceiling(result, no_ceiling(
        "none: overload measures behaviour past capacity; its references are each server's "
        "sustainable rate and the latency bound its limit implies (sustainable, bound_s), "
        "measured in the same run"))
