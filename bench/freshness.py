"""``headwater bench freshness --json``: action produced -> changed row published on ``hw.params``.

Runs the whole path on a real broker, each stage its own process as in production: this process
sends impressions, each for a user never seen before, followed at once by a click;
``headwater join`` turns them into examples; ``headwater train`` (default sync intervals) trains
and publishes; a watcher thread here tails ``hw.params`` and stamps the first sparse message
carrying the user's ``user_id`` row. Latency = that stamp minus the time the click was
acknowledged by the broker. A second watcher on ``hw.examples`` gives the joiner's share.

The joiner must wait its join window before it can emit an example (it cannot know no further
click will come), so the window is part of the figure and is reported; the baseline figure is
the broker's own round trip for one message (produce -> consume), measured in the same run.

``end_to_end_p50_s`` / ``end_to_end_p99_s`` (:mod:`serving.end_to_end`, the demo's figure): once
a second during the timed traffic, now minus the ``watermark_ms`` (event time of the newest
example trained) of the newest ``hw.params`` message the watcher has read, i.e. as a replica
that applied it would report. ``--emit early`` runs the joiner with early emission (its hold,
``--early-hold-s``, replaces the window in the floor) and the trainer warm
(``--early-warmup-examples 0``): the bench times the steady path, and a fresh trainer's cold
start (its first examples a label wait late) is the demo's ``cold_start_s``.

Ceiling (a floor here: ``ceiling_ms``, against ``p50_ms``): the waits the design imposes plus
the transport, measured in the same run: the join window, half the sparse sync interval (a
click lands at a random phase of the periodic publish) and three broker round trips (click ->
joiner, example -> trainer, row -> watcher). Compute (join, train, encode) is what is left.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import numpy as np

from bench.harness import Ceiling, add_broker, add_common, with_ceiling
from streams.broker import stop_processes

log = logging.getLogger(__name__)

_PROBE_BASE = 7_000_000_000_000  # user ids far above anything else in the stream


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_broker(p)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--window-s", type=float, default=0.2, help="joiner's join window")
    p.add_argument("--sparse-sync-interval-s", type=float, default=1.0)
    p.add_argument("--emit", choices=("window", "early"), default="window", help="joiner emission")
    p.add_argument("--early-hold-s", type=float, default=0.1,
                   help="with --emit early: the hold (below --window-s)")
    p.add_argument("--timeout-s", type=float, default=15.0, help="give up on a sample after this")
    add_common(p, repeats=200, repeats_aliases=("--samples",), repeats_help="clicks to time",
               seed_help="seed of the probes' items")


class _Watcher(threading.Thread):
    """Tails partition 0 of a topic and stamps when each probe user first appears in it.

    ``kind="params"``: in a sparse ``user_id`` delta on hw.params; ``kind="examples"``: in an
    example batch on hw.examples (the joiner's share of the latency).
    """

    def __init__(self, kafka: Any, topic: str, kind: str = "params") -> None:
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.kind = kind
        self.consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None,
                                      enable_auto_commit=False, fetch_max_wait_ms=20,
                                      max_partition_fetch_bytes=16 << 20)
        tp = TopicPartition(topic, 0)
        self.consumer.assign([tp])
        self.consumer.seek_to_beginning(tp)
        self.seen: dict[int, float] = {}
        self.watermark_ms = -1  # newest hw.params watermark read (kind="params")
        self.stop = threading.Event()

    def _users(self, value: bytes) -> np.ndarray:
        from streams.events import decode_examples
        from paramsync import SPARSE, decode_params

        if self.kind == "examples":
            return decode_examples(value).user_id
        p = decode_params(value)
        self.watermark_ms = max(self.watermark_ms, int(p.watermark_ms))
        if p.kind == SPARSE and p.slot == "user_id" and p.rows:
            return p.table_delta().slots["user_id"].ids
        return np.zeros(0, np.int64)

    def run(self) -> None:
        while not self.stop.is_set():
            for msgs in self.consumer.poll(timeout_ms=50).values():
                now = time.time()
                for m in msgs:
                    ids = self._users(m.value)
                    for u in ids[ids >= _PROBE_BASE].tolist():  # a handful per second
                        self.seen.setdefault(u, now)
        self.consumer.close()


def _spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "headwater", "--log-level", "WARNING", *argv],
                            stdout=subprocess.DEVNULL)


def _broker_round_trip(kafka: Any, topic: str, n: int = 20) -> float:
    """Median produce -> consume latency of one small message (the transport's floor)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    prod = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=0)
    cons = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None, fetch_max_wait_ms=10)
    tp = TopicPartition(topic, 0)
    cons.assign([tp])
    cons.seek_to_end(tp)
    cons.poll(timeout_ms=100)
    lat = []
    try:
        for _ in range(n):
            t0 = time.time()
            prod.send(topic, b"x", partition=0).get(timeout=10)
            got = False
            while not got and time.time() - t0 < 5:
                got = bool(cons.poll(timeout_ms=20))
            lat.append((time.time() - t0) * 1000)
    finally:
        prod.close()
        cons.close()
    return float(np.median(lat))


def run(args: argparse.Namespace) -> dict:
    from kafka import KafkaProducer

    from streams.broker import BrokerConfig, EmbeddedBroker
    from streams.events import Action, Impression, encode_actions, encode_impression
    from serving.end_to_end import EndToEndFreshness, lag_s
    from streams.kafka_io import KafkaConfig, create_topics

    broker = None
    if args.bootstrap_servers:
        kafka = KafkaConfig(bootstrap_servers=args.bootstrap_servers)
    else:
        broker = EmbeddedBroker(BrokerConfig(port=0, topic_prefix="bench"))
        broker.start()
        kafka = broker.kafka_config()
    threads: list[_Watcher] = []
    procs: list[subprocess.Popen] = []
    try:
        kafka = replace(kafka, topic_prefix=f"fresh-{uuid.uuid4().hex[:8]}")
        topics = create_topics(kafka)
        floor_ms = _broker_round_trip(kafka, topics.dlq)
        state = tempfile.mkdtemp(prefix="hw-fresh-join-")
        common = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
        procs = [
            _spawn(["join", *common, "--group-id", "fresh-joiner", "--state-dir", state,
                    "--window-s", str(args.window_s), "--allowed-lateness-s", "0",
                    "--emit", args.emit, "--early-hold-s", str(args.early_hold_s),
                    "--idle-close-s", "0.5", "--examples-per-message", "1024"]),
            _spawn(["train", *common, "--json", "--group-id", "fresh-trainer",
                    "--sparse-sync-interval-s", str(args.sparse_sync_interval_s),
                    *(["--early-warmup-examples", "0"] if args.emit == "early" else [])]),
        ]
        watcher = _Watcher(kafka, topics.params)
        joined = _Watcher(kafka, topics.examples, kind="examples")
        threads = [joined, watcher]
        for t in threads:
            t.start()
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=0)
        rng = np.random.default_rng(args.seed)
        period = 1.0 / args.rate

        def request(k: int) -> tuple[int, float]:
            user = _PROBE_BASE + k
            now_ms = int(time.time() * 1000)
            items = [int(i) for i in rng.integers(1, 500, 3)]
            imp = Impression(request_id=f"fresh-{k}", user_id=user, event_time_ms=now_ms,
                             items=items, item_sparse={"category": [[i % 17] for i in items]})
            key = imp.request_id.encode()
            producer.send(topics.impressions, encode_impression(imp), key=key).get(timeout=10)
            act = Action(request_id=f"fresh-{k}", user_id=user, item_id=items[0], kind="click",
                         event_time_ms=now_ms + 1)
            producer.send(topics.actions, encode_actions([act]), key=key).get(timeout=10)
            return user, time.time()

        # Warm-up (untimed): traffic until the first row comes out the far end, i.e. both
        # consumer groups have joined and the first snapshot is out.
        k, warm_deadline = 0, time.time() + 120
        while not watcher.seen and time.time() < warm_deadline:
            request(1_000_000 + k)
            k += 1
            time.sleep(period)
        sent: dict[int, float] = {}
        next_t = time.time()
        end_to_end, sampled = EndToEndFreshness(), time.time()
        for k in range(args.repeats):
            user, t = request(k)
            sent[user] = t
            if t - sampled >= 1.0:
                end_to_end.add(lag_s(watcher.watermark_ms, t * 1000))
                sampled = t
            next_t += period
            time.sleep(max(0.0, next_t - time.time()))
        deadline = time.time() + args.timeout_s
        while time.time() < deadline and len(watcher.seen.keys() & sent.keys()) < len(sent):
            time.sleep(0.1)
        producer.close()
        lat = np.array([(watcher.seen[u] - t) * 1000 for u, t in sent.items() if u in watcher.seen])
        join = np.array([(joined.seen[u] - t) * 1000 for u, t in sent.items() if u in joined.seen])
        p50 = float(np.percentile(lat, 50)) if len(lat) else None
        wait_s = args.early_hold_s if args.emit == "early" else args.window_s
        floor = wait_s * 1000 + args.sparse_sync_interval_s * 500 + 3 * floor_ms
        ceiling = Ceiling(floor, "ms", measured=p50, lower_is_better=True, note=(
            "a floor (lower is better; the fraction is floor / p50): join window (early: hold) + half the "
            "sparse sync interval + 3 broker round trips measured in this run"))
        return with_ceiling({
            "bench": "freshness", "samples": int(len(lat)), "missing": len(sent) - int(len(lat)),
            "p50_ms": p50,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None,
            # The joiner's share: action produced -> its example on hw.examples.
            "join_p50_ms": float(np.percentile(join, 50)) if len(join) else None,
            "join_p99_ms": float(np.percentile(join, 99)) if len(join) else None,
            "join_window_ms": args.window_s * 1000,
            "emit": args.emit, **end_to_end.quantiles(),
            "sparse_sync_interval_s": args.sparse_sync_interval_s,
            "baseline_broker_round_trip_ms": floor_ms,
            "repeats": args.repeats, "seed": args.seed,
        }, ceiling, named="ceiling_ms", digits=1)
    finally:
        stop_processes(procs)  # SIGTERM: both stop cleanly
        for t in threads:
            t.stop.set()
        for t in threads:
            t.join(timeout=20)
        if broker is not None:
            broker.stop()
