"""``headwater bench trainer --nproc N --json``: the multi-rank trainer at 1 and N ranks, same run.

One broker, one topic set with N ``hw.examples`` partitions filled up front (messages spread
round-robin), then ``headwater train --nproc k`` for k = 1 and k = N, interleaved when repeated,
each in a fresh consumer group reading every example once. Each rank trains mini-batches of
``--batch-size`` (so N ranks train a global batch N times as large: weak scaling, as DDP does).
Throughput is global examples over the wall time from the first to the last global step (start-up
and the group's first fetch are not throughput).

``all_to_all_share`` is the N-rank run's time inside the exchange collectives over compute plus
exchange, averaged over ranks; waiting for a slower peer counts as exchange time. The 8-rank
figure is a model, not a measurement: per-step compute from the 1-rank run (each rank of 8 has
a core of its own and the same local batch), the N-rank run's exchange time per step scaled by
the share of ids that live on another rank ((k-1)/k) -- see README "Multi-rank training".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)


def _fill(kafka: Any, topic: str, batches: list[Any], partitions: int) -> None:
    from streams.events import encode_examples
    from streams.kafka_io import BatchProducer

    producer = BatchProducer(kafka, client_id="bench-fill")
    try:
        for i, b in enumerate(batches):
            producer.send(topic, encode_examples(b), partition=i % partitions)
        producer.flush()
    finally:
        producer.close()


def _train(kafka: Any, args: argparse.Namespace, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "headwater", "train", "--nproc", str(nproc), "--json",
           "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
           "--group-id", f"bench-dist-{uuid.uuid4().hex[:6]}", "--batch-size", str(args.batch_size),
           "--embedding-dim", str(args.dim), "--hidden", args.hidden,
           "--max-examples", str(args.examples), "--idle-exit-s", "30",
           "--max-batch-wait-ms", "1000", "--checkpoint-interval-s", "1000000000",
           "--torch-threads", str(args.threads)]
    if not args.publish:
        cmd += ["--no-publish"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if out.returncode != 0:
        raise RuntimeError(f"train --nproc {nproc} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _model(one: dict, many: dict, ranks: int) -> dict:
    """Scaling at ``ranks`` ranks from per-step compute (1 rank) and exchange (N ranks) times."""
    c1 = one["exchange_by_rank"][0]
    t_compute = c1["compute_s"] / max(c1["steps"], 1)
    n = many["world_size"]
    t_x = statistics.mean(r["seconds"] / max(r["steps"], 1) for r in many["exchange_by_rank"])
    t_x_k = t_x * ((ranks - 1) / ranks) / ((n - 1) / n) if n > 1 else 0.0
    return {"ranks": ranks, "compute_s_per_step": t_compute, "exchange_s_per_step": t_x_k,
            "scaling": ranks * t_compute / (t_compute + t_x_k)}


def run(args: argparse.Namespace) -> dict:
    from streams.broker import bench_kafka
    from streams.kafka_io import create_topics
    from training.synthetic import synthetic_examples

    n = args.nproc
    with bench_kafka(args.bootstrap_servers) as kafka:
        topics = create_topics(kafka, {"examples": n})
        batches = synthetic_examples(args.examples, args.message_rows, args.slots, args.vocab,
                                     event_time_ms=int(time.time() * 1000))
        _fill(kafka, topics.examples, batches, n)
        runs: dict[int, list[dict]] = {1: [], n: []}
        for _ in range(args.repeats):
            for k in ((1, n) if n > 1 else (1,)):
                runs[k].append(_train(kafka, args, k))
        best = {k: max(rs, key=lambda r: r["global_examples_per_s"]) for k, rs in runs.items()}
        eps_1 = best[1]["global_examples_per_s"]
        eps_n = best[n]["global_examples_per_s"]
        share = statistics.mean(r["share"] for r in best[n]["exchange_by_rank"])
        model = _model(best[1], best[n], 8)
        return {
            "bench": "trainer", "nproc": n, "examples_per_s_1": eps_1, "examples_per_s_n": eps_n,
            "scaling": eps_n / eps_1, "all_to_all_share": share,
            "runs_examples_per_s": {str(k): [round(r["global_examples_per_s"]) for r in rs]
                                    for k, rs in runs.items()},
            "examples": args.examples, "batch_size_per_rank": args.batch_size,
            "slots": args.slots, "dim": args.dim, "hidden": args.hidden, "threads": args.threads,
            "exchange_by_rank": [{k: round(v, 4) if isinstance(v, float) else v
                                  for k, v in r.items()} for r in best[n]["exchange_by_rank"]],
            "compute_s_1": round(best[1]["exchange_by_rank"][0]["compute_s"], 3),
            "modelled_8_ranks": {k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in model.items()},
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        }
