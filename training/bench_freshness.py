"""``headwater bench freshness --json``: action produced -> changed row published on ``hw.params``.

Runs the whole path in one process on a real broker: a producer thread sends impressions, each
for a user never seen before, followed at once by a click; the streams joiner (a thread) turns
them into examples; the online trainer (a thread, default sync intervals) trains and publishes;
a watcher thread tails ``hw.params`` and stamps the first sparse message carrying the user's
``user_id`` row. Latency = that stamp minus the time the click was acknowledged by the broker.

The joiner must wait its join window before it can emit an example (it cannot know no further
click will come), so the window is part of the figure and is reported; the baseline figure is
the broker's own round trip for one message (produce -> consume), measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_PROBE_BASE = 7_000_000_000_000  # user ids far above anything else in the stream


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", default="", help="use this broker (default: start Tansu)")
    p.add_argument("--samples", type=int, default=200, help="clicks to time")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--window-s", type=float, default=0.2, help="joiner's join window")
    p.add_argument("--sparse-sync-interval-s", type=float, default=1.0)
    p.add_argument("--timeout-s", type=float, default=15.0, help="give up on a sample after this")


class _Watcher(threading.Thread):
    """Tails hw.params partition 0 and stamps when each probe user's row first appears."""

    def __init__(self, kafka: Any, topic: str) -> None:
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None,
                                      enable_auto_commit=False, fetch_max_wait_ms=20,
                                      max_partition_fetch_bytes=16 << 20)
        tp = TopicPartition(topic, 0)
        self.consumer.assign([tp])
        self.consumer.seek_to_beginning(tp)
        self.seen: dict[int, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from training.params_wire import SPARSE, decode_params

        while not self.stop.is_set():
            for msgs in self.consumer.poll(timeout_ms=50).values():
                now = time.time()
                for m in msgs:
                    p = decode_params(m.value)
                    if p.kind == SPARSE and p.slot == "user_id" and len(p.ids):
                        probes = p.ids[p.ids >= _PROBE_BASE]
                        for u in probes.tolist():
                            self.seen.setdefault(u, now)
        self.consumer.close()


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
    from streams.joiner import JoinerConfig, OnlineJoiner
    from streams.kafka_io import KafkaConfig, create_topics
    from training.config import TrainerConfig
    from training.trainer import OnlineTrainer

    broker = None
    if args.bootstrap_servers:
        kafka = KafkaConfig(bootstrap_servers=args.bootstrap_servers)
    else:
        broker = EmbeddedBroker(BrokerConfig(port=0, topic_prefix="bench"))
        broker.start()
        kafka = broker.kafka_config()
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        kafka = replace(kafka, topic_prefix=f"fresh-{uuid.uuid4().hex[:8]}")
        topics = create_topics(kafka)
        floor_ms = _broker_round_trip(kafka, topics.dlq)
        state = tempfile.mkdtemp(prefix="hw-fresh-join-")
        joiner = OnlineJoiner(JoinerConfig(
            bootstrap_servers=kafka.bootstrap_servers, topic_prefix=kafka.topic_prefix,
            group_id="fresh-joiner", state_dir=state, window_s=args.window_s,
            allowed_lateness_s=0.0, idle_close_s=0.5, examples_per_message=1024))
        trainer = OnlineTrainer(TrainerConfig(group_id="fresh-trainer",
                                              sparse_sync_interval_s=args.sparse_sync_interval_s),
                                kafka)
        watcher = _Watcher(kafka, topics.params)
        threads = [threading.Thread(target=joiner.run, args=(stop,), daemon=True),
                   threading.Thread(target=trainer.run, args=(stop,), daemon=True), watcher]
        for t in threads:
            t.start()
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=0)
        sent: dict[int, float] = {}
        rng = np.random.default_rng(0)
        period = 1.0 / args.rate
        next_t = time.time()
        for k in range(args.samples):
            user = _PROBE_BASE + k
            now_ms = int(time.time() * 1000)
            items = [int(i) for i in rng.integers(1, 500, 3)]
            imp = Impression(request_id=f"fresh-{k}", user_id=user, event_time_ms=now_ms, items=items,
                             item_sparse={"category": [[i % 17] for i in items]})
            producer.send(topics.impressions, encode_impression(imp)).get(timeout=10)
            act = Action(request_id=f"fresh-{k}", user_id=user, item_id=items[0], kind="click",
                         event_time_ms=now_ms + 1)
            producer.send(topics.actions, encode_actions([act])).get(timeout=10)
            sent[user] = time.time()
            next_t += period
            time.sleep(max(0.0, next_t - time.time()))
        deadline = time.time() + args.timeout_s
        while time.time() < deadline and len(watcher.seen.keys() & sent.keys()) < len(sent):
            time.sleep(0.1)
        producer.close()
        lat = np.array([(watcher.seen[u] - t) * 1000 for u, t in sent.items() if u in watcher.seen])
        return {
            "bench": "freshness", "samples": int(len(lat)), "missing": len(sent) - int(len(lat)),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None,
            "join_window_ms": args.window_s * 1000,
            "sparse_sync_interval_s": args.sparse_sync_interval_s,
            "baseline_broker_round_trip_ms": floor_ms,
        }
    finally:
        stop.set()
        if threads:
            threads[-1].stop.set()  # the watcher
        for t in threads:
            t.join(timeout=20)
        if broker is not None:
            broker.stop()
