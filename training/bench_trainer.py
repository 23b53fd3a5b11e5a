"""``headwater bench trainer --json``: examples/s trained from ``hw.examples`` on a real broker.

Fills a fresh topic set with synthetic example batches (:mod:`training.synthetic`: 26 slots by
default, Zipf-distributed ids, so the table sees hot and cold rows as in production), then
measures in the same run:

- the *baseline*: consuming and decoding the same messages without training (the I/O ceiling);
- the trainer: :class:`~training.trainer.OnlineTrainer` end to end, with the time split
  consume / decode / lookup / forward+backward / update.
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", default="", help="use this broker (default: start Tansu)")
    p.add_argument("--examples", type=int, default=50 * 4096, help="examples to train")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--slots", type=int, default=26, help="sparse slots")
    p.add_argument("--dim", type=int, default=16, help="embedding dim")
    p.add_argument("--hidden", default="256,128,64", help="MLP widths (3 layers)")
    p.add_argument("--vocab", type=int, default=200_000, help="distinct ids per slot")
    p.add_argument("--message-rows", type=int, default=4096, help="examples per hw.examples message")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a shared 2-core box, OpenMP wake-ups of a "
                        "second thread cost more than it computes; the other core runs Kafka I/O)")
    p.add_argument("--dense-precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="tower forward/backward precision (TrainerConfig.dense_precision)")
    p.add_argument("--publish", action="store_true", help="also publish deltas to hw.params every 1 s")
    p.add_argument("--nproc", type=int, default=0,
                   help="compare the multi-rank trainer at 1 and N ranks in one run (0: the "
                        "one-process trainer against consume+decode)")
    p.add_argument("--repeats", type=int, default=1, help="with --nproc: runs per rank count, interleaved")
    p.add_argument("--timeout-s", type=float, default=600.0, help="with --nproc: limit per run")


def _fill(kafka: Any, topic: str, batches: list[Any]) -> None:
    from streams.events import encode_examples
    from streams.kafka_io import BatchProducer

    producer = BatchProducer(kafka, client_id="bench-fill")
    try:
        for b in batches:
            producer.send(topic, encode_examples(b))
        producer.flush()
    finally:
        producer.close()


def _baseline(kafka: Any, topic: str, expect: int) -> float:
    """Consume + decode every message in a fresh group: examples/s without training.

    Timed from the poll that completes the group assignment, like the trainer's run.
    """
    from streams.events import decode_examples
    from streams.kafka_io import GroupConsumer

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
        from training.distributed.bench import run as run_ranks

        return run_ranks(args)
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
                                     event_time_ms=int(time.time() * 1000))
        cfg = TrainerConfig(batch_size=args.batch_size, embedding_dim=args.dim,
                            hidden=tuple(int(h) for h in args.hidden.split(",")),
                            publish=args.publish, max_examples=args.examples, idle_exit_s=30.0,
                            checkpoint_interval_s=1e9, group_id="bench-trainer",
                            max_batch_wait_ms=1000, dense_precision=args.dense_precision)
        t0 = time.perf_counter()
        _fill(kafka, topics.examples, batches)
        fill_s = time.perf_counter() - t0
        baseline = _baseline(kafka, topics.examples, args.examples)
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
        return {
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
        }
