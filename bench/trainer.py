"""``headwater bench trainer --json``: examples/s trained from ``hw.examples`` on a real broker.

Fills a fresh topic set with synthetic example batches (:mod:`training.synthetic`: 26 slots by
default, Zipf-distributed ids, so the table sees hot and cold rows as in production), then
measures in the same run:

- the *baseline*: consuming and decoding the same messages without training (the I/O ceiling);
- the trainer: :class:`~training.trainer.OnlineTrainer` end to end, with the time split
  consume / decode / lookup / forward+backward / update;
- the ceiling (``ceiling_examples_per_s``): the model's own step alone
  (:meth:`training.learner.Learner.train`: lookup, forward, backward, dense and sparse update) on
  the same examples cut into mini-batches in memory, on a fresh learner with the same config and
  threads: what the trainer would reach if Kafka, decoding and batch forming cost nothing.

``--nproc N`` runs the multi-rank trainer at 1 and N ranks instead, in the same run. One
broker, one topic set with N ``hw.examples`` partitions filled up front (messages spread
round-robin), then ``headwater train --nproc k`` for k = 1 and k = N, interleaved when repeated,
each in a fresh consumer group reading every example once. Each rank trains mini-batches of
``--batch-size`` (so N ranks train a global batch N times as large: weak scaling, as DDP does).
Throughput is global examples over the wall time from the first to the last global step (start-up
and the group's first fetch are not throughput).

``all_to_all_share`` is the N-rank run's time inside the exchange collectives over compute plus
exchange, averaged over ranks; waiting for a slower peer counts as exchange time. The 8-rank
figure is a model, not a measurement: per-step compute from the 1-rank run (each rank of 8 has
a core of its own and the same local batch), the N-rank run's exchange time per step scaled by
the share of ids that live on another rank ((k-1)/k) -- see docs/benchmarks.md "Multi-rank training".

Ceiling (``ceiling_examples_per_s``): linear scaling, N times the 1-rank run's examples/s in the
same run; ``fraction_of_ceiling`` is then ``scaling / N``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.harness import Ceiling, add_broker, add_common, add_threads, with_ceiling

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_broker(p)
    p.add_argument("--examples", type=int, default=50 * 4096, help="examples to train")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--slots", type=int, default=26, help="sparse slots")
    p.add_argument("--dim", type=int, default=16, help="embedding dim")
    p.add_argument("--hidden", default="256,128,64", help="MLP widths (3 layers)")
    p.add_argument("--vocab", type=int, default=200_000, help="distinct ids per slot")
    p.add_argument("--message-rows", type=int, default=4096, help="examples per hw.examples message")
    add_threads(p, "torch intra-op threads (1: on a shared 2-core box, OpenMP wake-ups of a second "
                   "thread cost more than it computes; the other core runs Kafka I/O)")
    p.add_argument("--dense-precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="tower forward/backward precision (TrainerConfig.dense_precision)")
    p.add_argument("--publish", action="store_true", help="also publish deltas to hw.params every 1 s")
    p.add_argument("--nproc", type=int, default=0,
                   help="compare the multi-rank trainer at 1 and N ranks in one run (0: the "
                        "one-process trainer against consume+decode)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="with --nproc: limit per run")
    add_common(p, repeats=1, repeats_help="in-memory passes of the ceiling (best); with --nproc: "
                                          "runs per rank count, interleaved", seed_help="example stream seed")


def _fill(kafka: Any, topic: str, batches: list[Any], partitions: int = 1) -> None:
    """Sends the example batches; over ``partitions`` > 1, round-robin."""
    from streams.events import encode_examples
    from streams.kafka_producer import BatchProducer

    producer = BatchProducer(kafka, client_id="bench-fill")
    try:
        for i, b in enumerate(batches):
            producer.send(topic, encode_examples(b), partition=i % partitions if partitions > 1 else None)
        producer.flush()
    finally:
        producer.close()


def _baseline(kafka: Any, topic: str, expect: int) -> float:
    """Consume + decode every message in a fresh group: examples/s without training.

    Timed from the poll that completes the group assignment, like the trainer's run.
    """
    from streams.events import decode_examples
    from streams.kafka_consumer import GroupConsumer

    consumer = GroupConsumer(kafka, [topic], f"bench-baseline-{uuid.uuid4().hex[:6]}")
    try:
        seen = 0
        deadline = time.monotonic() + 120
        t0 = time.perf_counter()
        while not consumer.assignment() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            for r in consumer.poll(timeout_ms=200, max_records=64):  # joins the group
                seen += len(decode_examples(r.value))
        while seen < expect and time.monotonic() < deadline:
            for r in consumer.poll(timeout_ms=200, max_records=64):
                seen += len(decode_examples(r.value))
        return seen / max(time.perf_counter() - t0, 1e-9)
    finally:
        consumer.close()


def run(args: argparse.Namespace) -> dict:
    if args.nproc:
        return _run_ranks(args)
    import torch

    from streams.broker import bench_kafka
    from streams.kafka_io import create_topics
    from training.config import TrainerConfig
    from training.synthetic import synthetic_examples
    from training.trainer import OnlineTrainer

    torch.set_num_threads(args.threads)
    with bench_kafka(args.bootstrap_servers) as kafka:
        topics = create_topics(kafka)
        batches = synthetic_examples(args.examples, args.message_rows, args.slots, args.vocab,
                                     seed=args.seed, event_time_ms=int(time.time() * 1000))
        cfg = TrainerConfig(batch_size=args.batch_size, embedding_dim=args.dim,
                            hidden=tuple(int(h) for h in args.hidden.split(",")),
                            publish=args.publish, max_examples=args.examples, idle_exit_s=30.0,
                            checkpoint_interval_s=1e9, group_id="bench-trainer",
                            max_batch_wait_ms=1000, dense_precision=args.dense_precision)
        t0 = time.perf_counter()
        _fill(kafka, topics.examples, batches)
        fill_s = time.perf_counter() - t0
        baseline = _baseline(kafka, topics.examples, args.examples)
        # The ceiling before the trainer, each pass's learner freed after it: then neither side
        # runs beside the other's memory.
        ceiling_s = min(_learner_alone(cfg, batches, args.batch_size) for _ in range(max(1, args.repeats)))
        gc.collect()
        trainer = OnlineTrainer(cfg, kafka)
        # The group join (seconds on Tansu) is not throughput: the clock starts with the poll
        # that completes the assignment, so that poll's fetch and everything after is timed.
        deadline = time.monotonic() + 60
        t0, c0 = time.perf_counter(), 0.0
        while not trainer.consumer.assignment() and time.monotonic() < deadline:
            t0, c0 = time.perf_counter(), trainer.consume_s
            trainer.step()
        trainer.consume_s -= c0
        summary = trainer.run()
        elapsed = time.perf_counter() - t0
        n = summary["examples_trained"]
        times = summary["times"]
        total = sum(times.values())
        examples_per_s = n / elapsed
        ceiling = Ceiling(args.examples / ceiling_s, "examples/s", measured=examples_per_s, note=(
            "the learner's step alone (lookup, forward, backward, update) on the same examples in "
            "in-memory mini-batches, fresh learner, same config and threads: no Kafka, no decoding"))
        return with_ceiling({
            "bench": "trainer", "examples_per_s": n / elapsed, "examples": n,
            "elapsed_s": elapsed, "batch_size": args.batch_size, "slots": args.slots,
            "dim": args.dim, "hidden": args.hidden, "threads": args.threads,
            "publish": bool(args.publish),
            "dense_precision": "bf16" if trainer.learner.bf16 else "fp32",
            "split_s": {k.removesuffix("_s"): round(v, 3) for k, v in times.items()},
            "split_frac": {k.removesuffix("_s"): round(v / total, 3) for k, v in times.items()},
            "baseline_consume_decode_examples_per_s": baseline,
            "fill_examples_per_s": args.examples / fill_s,
            "prequential_auc": (summary.get("eval") or {}).get("overall", {}).get("auc"),
            "repeats": args.repeats, "seed": args.seed,
        }, ceiling, named="ceiling_examples_per_s", digits=1)


def _learner_alone(cfg: Any, batches: list[Any], batch_size: int) -> float:
    """Seconds :meth:`Learner.train` takes for ``batches`` cut into ``batch_size`` mini-batches
    (cut before the clock starts), on a fresh learner built as the trainer builds its own."""
    import numpy as np

    from streams.events import ExampleBatch
    from training.learner import Learner

    rows = ExampleBatch.concat(batches)
    minis = [rows.take(np.arange(i, min(i + batch_size, len(rows))))
             for i in range(0, len(rows), batch_size)]
    learner = Learner.for_batch(cfg, minis[0])
    t0 = time.perf_counter()
    for mb in minis:
        learner.train(mb)
    return time.perf_counter() - t0


# --- --nproc N: the multi-rank trainer at 1 and N ranks ---------------------------------------

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


def _run_ranks(args: argparse.Namespace) -> dict:
    from streams.broker import bench_kafka
    from streams.kafka_io import create_topics
    from training.synthetic import synthetic_examples

    n = args.nproc
    with bench_kafka(args.bootstrap_servers) as kafka:
        topics = create_topics(kafka, {"examples": n})
        batches = synthetic_examples(args.examples, args.message_rows, args.slots, args.vocab,
                                     seed=args.seed, event_time_ms=int(time.time() * 1000))
        _fill(kafka, topics.examples, batches, partitions=n)
        runs: dict[int, list[dict]] = {1: [], n: []}
        for _ in range(args.repeats):
            for k in ((1, n) if n > 1 else (1,)):
                runs[k].append(_train(kafka, args, k))
        best = {k: max(rs, key=lambda r: r["global_examples_per_s"]) for k, rs in runs.items()}
        eps_1 = best[1]["global_examples_per_s"]
        eps_n = best[n]["global_examples_per_s"]
        share = statistics.mean(r["share"] for r in best[n]["exchange_by_rank"])
        model = _model(best[1], best[n], 8)
        ceiling = Ceiling(n * eps_1, "examples/s", measured=eps_n, note=(
            f"linear scaling: {n} x the 1-rank examples/s of the same run (weak scaling, "
            "local batch fixed)"))
        return with_ceiling({
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
            "repeats": args.repeats, "seed": args.seed,
        }, ceiling, named="ceiling_examples_per_s", digits=1)
