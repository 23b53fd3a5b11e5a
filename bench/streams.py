"""``headwater bench streams --json``: generator -> broker -> joiner -> hw.examples, end to end.

A real Tansu broker, the joiner in its own process (as deployed), the synthetic generator as the
source. ``events_per_s`` counts input events (shown items + actions) from the first send to the
last example read back; ``lost`` is expected examples minus unique example ids received. The
baseline measured in the same run is the producer alone (``produce_events_per_s``): the joiner
cannot be faster than events can be put into the broker.

Scale-out: one pass per ``--joiners`` setting (default 1 and 2), each on fresh topics of
``--partitions`` input partitions, the joiners in one consumer group; ``events_per_s_by_joiners``
and ``scale_1_to_2`` compare them. The top-level figures are the first setting's. With
``--drain`` the input is produced first and the joiners (already in their group, reading
nothing) are timed alone: the producer does not compete with them for the cores.

Ceiling (``ceiling_events_per_s``): the same bytes (the generator's messages, re-made from the
seed) produced and then consumed by plain kafka-python clients on fresh topics of the same
broker, ``--repeats`` passes, medians. The joiner's input must be produced and consumed at least
once, by processes that run side by side, so the slower of the two raw rates bounds its
events/s (its output, examples, is extra traffic on top).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import multiprocessing as mp
import pstats
import tempfile
import time
import uuid

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from bench.harness import Ceiling, add_common, median, with_ceiling
from streams.broker import BrokerConfig, EmbeddedBroker
from streams.events import decode_examples, example_ids, keep_negative
from streams.generator import GeneratorConfig, SyntheticStream, produce_synthetic
from streams.joiner import JoinerConfig, OnlineJoiner
from streams.kafka_consumer import read_topic
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=1_000_000, help="input events to push (approx.)")
    p.add_argument("--items-per-request", type=int, default=20)
    p.add_argument("--negative-rate", type=float, default=1.0)
    p.add_argument("--profile", action="store_true", help="profile the joiner; top functions to stderr")
    p.add_argument("--joiners", default="1,2",
                   help="joiner processes per pass, comma-separated (one consumer group each pass)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of each input topic")
    p.add_argument("--drain", action="store_true",
                   help="produce the whole input first, then time the joiners alone (they join "
                        "their group before, reading nothing); default: produce and join at once")
    p.add_argument("--timeout-s", type=float, default=300.0)
    add_common(p, repeats=3, repeats_help="raw produce/consume passes of the ceiling (medians)",
               seed_help="generator seed")


def _joiner_process(cfg: JoinerConfig, ready, go, stop, profile: bool, out, owned, slot: int) -> None:
    prof = cProfile.Profile() if profile else None
    joiner = OnlineJoiner(cfg)
    while not joiner.consumer.assignment() and not stop.is_set():
        if not go.is_set():
            joiner.pause()
        joiner.step(timeout_ms=100)
    ready.set()
    while not go.is_set() and not stop.is_set():  # --drain: in the group, reading nothing yet
        joiner.pause()  # (partitions a later rebalance assigns start unpaused)
        joiner.step(timeout_ms=100)
        owned[slot] = len(joiner.consumer.assignment())
    joiner.resume()
    if prof:
        prof.enable()
    try:
        while not stop.is_set():
            joiner.step(timeout_ms=50)
    finally:
        joiner.close()
        if prof:
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            out.put(buf.getvalue())


def _measure(broker: EmbeddedBroker, tmp: str, gen: GeneratorConfig, args: argparse.Namespace,
             joiners: int, expected: np.ndarray) -> dict:
    """One pass: fresh topics with ``--partitions`` input partitions, ``joiners`` joiner processes
    in one consumer group, the generator's stream produced, examples read back."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    broker.create_topics(prefix, {"impressions": args.partitions, "actions": args.partitions,
                                  "examples": args.partitions})
    kafka = broker.kafka_config(prefix)
    topics = topic_names(prefix)
    ctx = mp.get_context("spawn")
    stop, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    owned = ctx.Array("i", joiners)  # input partitions each joiner holds (--drain)
    if not args.drain:
        go.set()
    procs, readies = [], []
    for i in range(joiners):
        cfg = JoinerConfig(bootstrap_servers=broker.bootstrap_servers, topic_prefix=prefix,
                           group_id=f"{prefix}-joiners", state_dir=f"{tmp}/{prefix}-{i}",
                           window_s=60, allowed_lateness_s=5, negative_rate=args.negative_rate)
        ready = ctx.Event()
        proc = ctx.Process(target=_joiner_process,
                           args=(cfg, ready, go, stop, args.profile and i == 0, out, owned, i),
                           daemon=True)
        proc.start()
        procs.append(proc)
        readies.append(ready)
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a joiner did not join its consumer group within 60 s")
        time.sleep(1.0 if joiners > 1 else 0.0)  # the last join's rebalance settles
        if args.drain:  # every joiner holds its share of both inputs, for a second
            _wait_split(owned, 2 * args.partitions, time.monotonic() + 60)
        producer = BatchProducer(kafka, client_id="hw-bench")
        t0 = t_send = time.perf_counter()
        events, requests = produce_synthetic(gen, producer, topics)
        t_produced = time.perf_counter()
        producer.close()
        if args.drain:  # the input is in the broker: time the joiners alone from here
            t0 = time.perf_counter()
            go.set()
        received, t_last = _read_examples(kafka, topics.examples, len(expected),
                                          t0 + args.timeout_s)
    finally:
        stop.set()
        profile_text = out.get(timeout=30) if args.profile else ""
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    if profile_text:
        log.warning("joiner profile (tottime):\n%s", profile_text)
    unique = np.unique(received)
    elapsed = t_last - t0
    return {"joiners": joiners, "events": events, "requests": requests,
            "events_per_s": round(events / elapsed, 1), "elapsed_s": round(elapsed, 3),
            "examples": int(len(unique)), "duplicates": int(len(received) - len(unique)),
            "lost": int(len(np.setdiff1d(expected, unique))),
            "produce_events_per_s": round(events / (t_produced - t_send), 1),
            "dlq": len(read_topic(kafka, topics.dlq, idle_s=0.5)),
            "late": len(read_topic(kafka, topics.late, idle_s=0.5)), "topics": topics}


def _wait_split(owned, total: int, deadline: float) -> None:
    stable = None
    while time.monotonic() < deadline:
        split = list(owned)
        if sum(split) == total and min(split) > 0:
            stable = stable or time.monotonic()
            if time.monotonic() - stable >= 1.0:
                return
        else:
            stable = None
        time.sleep(0.1)
    raise RuntimeError(f"the joiners did not settle on the {total} input partitions: {list(owned)}")


def run(args: argparse.Namespace) -> dict:
    gen = GeneratorConfig(seed=args.seed, items_per_request=args.items_per_request,
                          requests=max(1, args.events // (args.items_per_request + 2)))
    settings = sorted({int(j) for j in str(args.joiners).split(",") if j.strip()})
    if not settings or settings[0] < 1:
        raise ValueError("--joiners takes joiner counts >= 1, e.g. 1,2")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker(BrokerConfig(port=0, topic_prefix=prefix)) as broker, \
            tempfile.TemporaryDirectory() as tmp:
        # The truth to check against comes from the seed; computed outside the timed part.
        expected = _expected_ids(gen, args.negative_rate)
        runs = [_measure(broker, tmp, gen, args, n, expected) for n in settings]
        first = runs[0]
        kafka = broker.kafka_config(prefix)
        raw = _raw_ceiling(broker, kafka, gen, first.pop("topics"), prefix, args.repeats,
                           time.perf_counter() + args.timeout_s, args.partitions)
        for r in runs[1:]:
            r.pop("topics")
    events = first["events"]
    by_joiners = {str(r["joiners"]): r["events_per_s"] for r in runs}
    ceiling = Ceiling(events / max(raw["produce_s"], raw["consume_s"]), "events/s",
                      measured=first["events_per_s"],
                      note="the same input bytes produced, then consumed, by plain kafka-python on this "
                           "broker (the slower of the two raw rates); the joiner does both and more")
    return with_ceiling({
        "bench": "streams", "events": events, "requests": first["requests"],
        "events_per_s": first["events_per_s"], "elapsed_s": first["elapsed_s"],
        "examples": first["examples"], "expected_examples": int(len(expected)),
        "duplicates": first["duplicates"], "lost": first["lost"], "dlq": first["dlq"],
        "late": first["late"], "produce_events_per_s": first["produce_events_per_s"],
        "items_per_request": args.items_per_request, "negative_rate": args.negative_rate,
        "partitions": args.partitions, "joiners": settings,
        "mode": "drain" if args.drain else "live",
        "events_per_s_by_joiners": by_joiners,
        "scale_1_to_2": (round(by_joiners["2"] / by_joiners["1"], 3)
                         if "1" in by_joiners and "2" in by_joiners else None),
        "runs": runs,
        "ceiling_produce_events_per_s": round(events / raw["produce_s"], 1),
        "ceiling_consume_events_per_s": round(events / raw["consume_s"], 1),
        # issue 24's name for the same ceiling: plain produce/consume of the same bytes
        "raw_kafka_events_per_s": round(events / max(raw["produce_s"], raw["consume_s"]), 1),
        "raw_messages": raw["messages"], "raw_bytes": raw["bytes"], "repeats": args.repeats,
        "cpus": os.cpu_count(), "seed": args.seed,
    }, ceiling, named="ceiling_events_per_s", digits=1)

class _Recorder:
    """Stands in for the producer: keeps every (topic, bytes) the generator sends."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None) -> None:
        self.messages.append((topic, value))

    def send_to_every_partition(self, topic: str, value: bytes) -> None:
        self.messages.append((topic, value))

    def flush(self) -> None:
        pass


def _raw_ceiling(broker: EmbeddedBroker, kafka, gen: GeneratorConfig, topics, prefix: str,
                 repeats: int, deadline: float, partitions: int = 1) -> dict:
    """Median seconds to produce, then to consume, the generator's bytes with plain kafka-python."""
    from kafka import KafkaProducer

    recorder = _Recorder()
    produce_synthetic(gen, recorder, topics)
    messages = recorder.messages
    compression = None if kafka.compression in ("", "none") else kafka.compression
    produce_s, consume_s = [], []
    for r in range(max(1, repeats)):
        raw = broker.create_topics(f"{prefix}-raw{r}", {"impressions": partitions,
                                                        "actions": partitions})
        rename = {topics.impressions: raw.impressions, topics.actions: raw.actions}
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all",
                                 compression_type=compression, linger_ms=kafka.linger_ms,
                                 batch_size=kafka.batch_bytes, max_request_size=kafka.max_message_bytes + 4096)
        try:
            t0 = time.perf_counter()
            for topic, value in messages:
                producer.send(rename[topic], value)
            producer.flush()
            produce_s.append(time.perf_counter() - t0)
        finally:
            producer.close()
        consume_s.append(_raw_consume(kafka, sorted(set(rename.values())), len(messages), deadline))
    return {"produce_s": median(produce_s), "consume_s": median(consume_s), "messages": len(messages),
            "bytes": sum(len(v) for _, v in messages)}


def _raw_consume(kafka, topics: list[str], want: int, deadline: float) -> float:
    """Seconds to fetch ``want`` messages from the start of ``topics`` (no decoding)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False,
                             max_partition_fetch_bytes=kafka.max_message_bytes)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or {0})]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        got = 0
        t0 = time.perf_counter()
        while got < want and time.perf_counter() < deadline:
            got += sum(len(m) for m in consumer.poll(timeout_ms=100, max_records=1000).values())
        if got < want:
            raise RuntimeError(f"raw consume read {got} of {want} messages before the deadline")
        return time.perf_counter() - t0
    finally:
        consumer.close()


def _expected_ids(gen: GeneratorConfig, negative_rate: float) -> np.ndarray:
    parts = []
    for b in SyntheticStream(gen).blocks(gen.requests):
        for r in range(len(b.request_index)):
            ids = example_ids(f"g{gen.seed}-{b.request_index[r]}", b.items[r])
            if negative_rate < 1.0:
                ids = ids[b.clicked[r] | keep_negative(ids, negative_rate)]
            parts.append(ids)
    return np.unique(np.concatenate(parts))


def _read_examples(kafka, topic: str, want: int, deadline: float) -> tuple[np.ndarray, float]:
    """Reads example ids until ``want`` unique ids arrived (or the deadline); (ids, time of last)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False,
                             max_partition_fetch_bytes=kafka.max_message_bytes)
    parts = consumer.partitions_for_topic(topic) or {0}
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ids: list[np.ndarray] = []
    seen = 0
    t_last = time.perf_counter()
    try:
        while time.perf_counter() < deadline:
            got = consumer.poll(timeout_ms=100, max_records=1000)
            for msgs in got.values():
                for m in msgs:
                    ids.append(decode_examples(m.value).example_id)
                    seen += len(ids[-1])
                t_last = time.perf_counter()
            if seen >= want and len(np.unique(np.concatenate(ids))) >= want:
                break
    finally:
        consumer.close()
    return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), t_last
