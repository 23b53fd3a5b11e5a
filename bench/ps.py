"""``headwater bench ps --json``: what fanning lookups out to PS shards costs a Recommend call.

One run, one broker (Tansu on loopback), one random model published twice by the real
``DeltaPublisher``: unsharded to one topic set, sharded (``--shards`` N) to another. Then, all as
real ``headwater serve`` processes over loopback gRPC: the baseline ``--role all`` (one table in
the process) and the candidate ``--role recommender`` in front of N ``--role ps --shard i/N``
processes, plus a second recommender over the same shards with ``--no-ps-batch-slots`` (one
fan-out per slot, one after another: the pre-batching path). One client calls all three in
interleaved rounds (so load on the shared machine hits them alike) with ``--candidates``
candidates per call, and the JSON line reports p50/p99 of each, the fan-out overhead, the largest
score difference from the baseline (should be ~0) and the load average.

Ceiling (a floor: ``ceiling_ms``, against ``sharded_p50_ms``): the local call plus one gRPC round
trip to a shard (a ``Health.Check`` on the same loopback, p50, measured in the same run). The
fan-out to the shards runs in parallel, so no sharded call can take less.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import numpy as np

from bench.harness import Ceiling, add_common, add_recommend_load, with_ceiling
from streams.broker import free_port, stop_processes

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=2, help="PS shards of the candidate")
    add_recommend_load(p, candidates=200, items=100_000)
    p.add_argument("--calls", type=int, default=25, help="calls per server per round")
    p.add_argument("--deadline-ms", type=float, default=200.0, help="the recommender's --ps-deadline-ms")
    add_common(p, repeats=20, repeats_aliases=("--rounds",), repeats_help="interleaved rounds",
               seed_help="seed of the model's weights and the requests")


def _publish(kafka: Any, model: Any, num_shards: int) -> None:
    from kafka import KafkaProducer

    from streams.kafka_io import topic_names
    from training.model import tower_to_safetensors
    from training.sync import DeltaPublisher, SyncConfig

    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", max_request_size=16 << 20)
    try:
        pub = DeltaPublisher(producer, topic_names(kafka.topic_prefix).params, model.table,
                             lambda: tower_to_safetensors(model.tower),
                             SyncConfig(num_param_shards=num_shards))
        pub.publish_snapshot(watermark_ms=int(time.time() * 1000))
    finally:
        producer.close()


def _serve(kafka: Any, port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "headwater", "serve", "--bootstrap-servers",
                             kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
                             "--port", str(port), "--precision", "float32", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _wait_serving(port: int, service: str, procs: list[subprocess.Popen], timeout_s: float = 180) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a bench server exited during start-up")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"127.0.0.1:{port} did not become SERVING")


def _round_trip_ms(port: int, service: str, calls: int = 200) -> float:
    """p50 of a minimal gRPC call (``Health.Check``) to ``port``: the transport's floor."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest(service=service)
        for _ in range(10):  # connection set-up is not the floor
            stub.Check(req, timeout=5)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.Check(req, timeout=5)
            lat.append((time.perf_counter() - t0) * 1000.0)
    return float(np.percentile(lat, 50))


def run(args: argparse.Namespace) -> dict:
    import grpc
    from rich.console import Console

    from serving.pb import SERVICE_NAME, pb2, pb2_grpc
    from serving.ps_service import PS_SERVICE_NAME
    from serving.testing import random_model
    from streams.broker import BrokerConfig, EmbeddedBroker
    from paramsync import params_partitions

    console = Console(stderr=True)
    n = args.shards
    model = random_model(slots=("user_id", "item_id", "f00"), items=args.items, users=args.items, seed=args.seed)
    procs: list[subprocess.Popen] = []
    broker = EmbeddedBroker(BrokerConfig(port=0, topic_prefix="hwbench"))
    broker.start()
    try:
        tag = uuid.uuid4().hex[:6]
        flat, sharded = f"psb-flat-{tag}", f"psb-sharded-{tag}"
        broker.create_topics(flat)
        broker.create_topics(sharded, {"params": params_partitions(n)})
        flat_kafka, sharded_kafka = broker.kafka_config(flat), broker.kafka_config(sharded)
        with console.status("publishing the model, starting servers..."):
            _publish(flat_kafka, model, 1)
            _publish(sharded_kafka, model, n)
            ps_ports = [free_port() for _ in range(n)]
            base_port, rec_port, slot_port = free_port(), free_port(), free_port()
            addrs = ",".join(f"127.0.0.1:{p}" for p in ps_ports)
            procs += [_serve(sharded_kafka, p, "--role", "ps", "--shard", f"{i}/{n}") for i, p in enumerate(ps_ports)]
            procs.append(_serve(flat_kafka, base_port))
            procs.append(_serve(sharded_kafka, rec_port, "--role", "recommender", "--ps-deadline-ms",
                                str(args.deadline_ms), "--ps", addrs))
            procs.append(_serve(sharded_kafka, slot_port, "--role", "recommender", "--ps-deadline-ms",
                                str(args.deadline_ms), "--ps", addrs, "--no-ps-batch-slots"))
            for p in ps_ports:
                _wait_serving(p, PS_SERVICE_NAME, procs)
            _wait_serving(base_port, SERVICE_NAME, procs)
            _wait_serving(rec_port, SERVICE_NAME, procs)
            _wait_serving(slot_port, SERVICE_NAME, procs)
        rng = np.random.default_rng(args.seed)
        pool = [pb2.RecommendRequest(user_id=int(u), candidate_item_ids=rng.choice(args.items, args.candidates,
                                                                                   replace=False).tolist(),
                                     context=[pb2.SparseFeature(slot="f00", ids=[int(u) % 97])])
                for u in rng.integers(0, args.items, 64)]
        names = ("local", "sharded", "per_slot")
        lat: dict[str, list[float]] = {k: [] for k in names}
        load_before = os.getloadavg()
        channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in (base_port, rec_port, slot_port)]
        try:
            stubs = {k: pb2_grpc.RecommenderStub(c) for k, c in zip(names, channels)}
            diff = 0.0
            for req in pool[:8]:  # warm-up, and all three must agree
                a, b, c = (np.array(sorted((i.item_id, i.score) for i in stubs[k].Recommend(req, timeout=10).items))
                           for k in names)
                diff = max(diff, float(np.max(np.abs(a - b))), float(np.max(np.abs(a - c))))
            for r in range(args.repeats):
                for name in names[r % 3:] + names[:r % 3]:
                    for k in range(args.calls):
                        t0 = time.perf_counter()
                        stubs[name].Recommend(pool[(r * args.calls + k) % len(pool)], timeout=10)
                        lat[name].append((time.perf_counter() - t0) * 1000.0)
        finally:
            for c in channels:
                c.close()
        round_trip_ms = _round_trip_ms(ps_ports[0], PS_SERVICE_NAME)
        load_after = os.getloadavg()
    finally:
        stop_processes(procs)
        broker.stop()
    stats = {k: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for k, v in lat.items()}
    console.print(f"local p50 {stats['local'][0]:.2f} ms p99 {stats['local'][1]:.2f} ms; sharded ({n} shards) "
                  f"p50 {stats['sharded'][0]:.2f} ms p99 {stats['sharded'][1]:.2f} ms; one fan-out per slot "
                  f"p50 {stats['per_slot'][0]:.2f} ms p99 {stats['per_slot'][1]:.2f} ms")
    ceiling = Ceiling(stats["local"][0] + round_trip_ms, "ms", measured=stats["sharded"][0], lower_is_better=True,
                      note="a floor (lower is better; the fraction is floor / sharded p50): the local "
                           "call's p50 plus one gRPC round trip (Health.Check p50) to a shard")
    return with_ceiling({
        "bench": "ps", "shards": n, "items": args.items, "candidates": args.candidates,
        "calls_each": len(lat["local"]),
        "local_p50_ms": round(stats["local"][0], 3), "local_p99_ms": round(stats["local"][1], 3),
        "sharded_p50_ms": round(stats["sharded"][0], 3), "sharded_p99_ms": round(stats["sharded"][1], 3),
        "per_slot_p50_ms": round(stats["per_slot"][0], 3), "per_slot_p99_ms": round(stats["per_slot"][1], 3),
        "fanout_overhead_p50_ms": round(stats["sharded"][0] - stats["local"][0], 3),
        "per_slot_overhead_p50_ms": round(stats["per_slot"][0] - stats["local"][0], 3),
        "max_score_diff": diff, "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
        "grpc_round_trip_p50_ms": round(round_trip_ms, 3), "rounds": args.repeats, "seed": args.seed,
    }, ceiling, named="ceiling_ms")
