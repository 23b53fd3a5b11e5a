"""faust-streaming version of the joiner, minimal: key = request id, state = the pending request in
a faust Table (RocksDB via rocksdict, changelog topic), closed when the watermark (max event time
seen by this worker - lateness) passes impression time + window.

    /tmp/engine_venv/bin/python scripts/engine_eval/faust_join.py BOOTSTRAP PREFIX GROUP STATE_DIR \
        [--eos] [--window-s 60]

Faust tables can only be changed from inside a stream (a timer may not), so the close runs in
the agent: whenever the watermark has moved on by a second of event time, the table is scanned
(local partitions only) and due requests are emitted to ``<prefix>.joined`` and deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import faust  # noqa: E402
import msgpack  # noqa: E402

from streams.events import Impression, Watermark, decode_event  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("bootstrap")
ap.add_argument("prefix")
ap.add_argument("group")
ap.add_argument("state_dir")
ap.add_argument("--eos", action="store_true")
ap.add_argument("--window-s", type=float, default=60.0)
ap.add_argument("--lateness-ms", type=int, default=5000)
ap.add_argument("--partitions", type=int, default=0, help="table partitions (0 = input's)")
ap.add_argument("--stats", default="")
ap.add_argument("--one-per-batch", action="store_true",
                help="tiny producer batches: Tansu 0.6 reports the high watermark as the last "
                     "batch's base offset + 1, and faust's recovery then raises ConsistencyError")
args = ap.parse_args()


def _input_partitions() -> int:
    from kafka import KafkaConsumer
    c = KafkaConsumer(bootstrap_servers=args.bootstrap)
    try:
        return len(c.partitions_for_topic(f"{args.prefix}.impressions") or {0})
    finally:
        c.close()


PARTS = args.partitions or _input_partitions()
app = faust.App(
    args.group, broker=f"kafka://{args.bootstrap}", store="rocksdb://",
    datadir=args.state_dir, topic_partitions=PARTS, table_standby_replicas=0,
    processing_guarantee="exactly_once" if args.eos else "at_least_once",
    web_enabled=False, broker_session_timeout=6.0, broker_heartbeat_interval=1.0,
    broker_commit_interval=1.0, consumer_auto_offset_reset="earliest",
    **({"producer_max_batch_size": 64} if args.one_per_batch else {}),
    producer_compression_type="lz4", producer_linger=0.005,  # aiokafka: lz4 via cramjam
)
inputs = app.topic(f"{args.prefix}.impressions", f"{args.prefix}.actions",
                   key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
inputs_names = (f"{args.prefix}.impressions", f"{args.prefix}.actions")
joined = app.topic(f"{args.prefix}.joined", key_type=bytes, value_type=bytes,
                   key_serializer="raw", value_serializer="raw")
# [close_ms, items, clicks]; use_partitioner: the changelog partition follows the key, not the
# event being processed (closes touch other keys of the same partition set).
pending = app.Table("pending", default=None, partitions=PARTS, key_type=str,
                    use_partitioner=True)

WINDOW_MS = int(args.window_s * 1000)
clock = {"max_t": 0, "scanned_at": 0, "first": None, "n": 0}


@app.agent(inputs)
async def join(stream):
    async for event in stream.events():
        key, raw, topic = event.key, event.value, event.message.topic
        if clock["first"] is None:
            clock["first"] = time.time()
            if args.stats:
                Path(args.stats).write_text(json.dumps({"pid": os.getpid(),
                                                        "first_input": clock["first"]}))
        ev = decode_event(raw)
        rid = key.decode()
        clock["n"] += 1
        if clock["n"] % 10000 == 0:
            print(f"progress n={clock['n']} max_t={clock['max_t']} pending={len(pending)}",
                  flush=True)
        if isinstance(ev, Impression):
            cur = pending.get(rid)
            pending[rid] = [ev.event_time_ms + WINDOW_MS, len(ev.items), cur[2] if cur else 0]
            t = ev.event_time_ms
        elif isinstance(ev, Watermark):
            t = ev.event_time_ms
        else:
            cur = pending.get(rid) or [0, 0, 0]  # an action before its impression: kept (close 0)
            cur[2] += len(ev)
            pending[rid] = cur
            t = max(a.event_time_ms for a in ev)
        # Faust reads the two topics in no event-time order (bursts of one, then the other), so
        # the watermark is the slower topic's progress (what streams.join_watermark does, minus
        # its per-partition refinements); one max over both closed requests before their clicks.
        clock[topic] = max(clock.get(topic, 0), t)
        clock["max_t"] = max(clock["max_t"], t)
        wm = min(clock.get(inputs_names[0], 0), clock.get(inputs_names[1], 0)) - args.lateness_ms
        if wm - clock["scanned_at"] >= 1000:
            clock["scanned_at"] = wm
            due = [(r, v) for r, v in pending.items() if v and v[1] and v[0] <= wm]
            for r, v in due:
                await joined.send(key=r.encode(),
                                  value=msgpack.packb({"rid": r, "items": v[1], "clicks": v[2]}))
                del pending[r]


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()
