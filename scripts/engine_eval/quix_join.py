"""Quix Streams version of the joiner, minimal: key = request id, state = the pending request
(impression + its clicks) in a session window per key, emitted once when the window closes.

    /tmp/engine_venv/bin/python scripts/engine_eval/quix_join.py BOOTSTRAP PREFIX GROUP STATE_DIR \
        [--eos] [--window-s 60]

Input: ``<prefix>.impressions`` and ``<prefix>.actions`` (project wire format, keyed by request
id, message timestamp = event time; see common.py); output: ``<prefix>.joined``. Partition
assignment, RocksDB state + changelog topics, restore and offset commits are Quix Streams'.
The session window stands in for "impression time + window": an impression opens it, clicks
(which come within the window) extend it, and ``final(closing_strategy="partition")`` emits it
when the partition's event time passes it (the end-of-stream watermark message closes the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import msgpack  # noqa: E402
from quixstreams import Application  # noqa: E402

from streams.events import Impression, Watermark, decode_event  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bootstrap")
    ap.add_argument("prefix")
    ap.add_argument("group")
    ap.add_argument("state_dir")
    ap.add_argument("--eos", action="store_true", help="processing_guarantee=exactly-once")
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--stats", default="", help="write {pid, first_input} JSON here")
    args = ap.parse_args()

    app = Application(
        broker_address=args.bootstrap, consumer_group=args.group,
        auto_offset_reset="earliest", state_dir=args.state_dir, loglevel="WARNING",
        commit_interval=1.0,
        processing_guarantee="exactly-once" if args.eos else "at-least-once",
        # Tansu needs short group timeouts for prompt rebalances (as kafka-python does here)
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                               "max.poll.interval.ms": 30000},
        producer_extra_config={"compression.type": "lz4", "linger.ms": 5},
    )
    imp = app.topic(f"{args.prefix}.impressions", value_deserializer="bytes", key_deserializer="str")
    act = app.topic(f"{args.prefix}.actions", value_deserializer="bytes", key_deserializer="str")
    out = app.topic(f"{args.prefix}.joined", value_serializer="bytes", key_serializer="str")

    first = {"t": None}

    def decode(raw: bytes) -> dict:
        if first["t"] is None:
            first["t"] = time.time()
            if args.stats:
                Path(args.stats).write_text(json.dumps({"pid": os.getpid(), "first_input": first["t"]}))
        ev = decode_event(raw)  # the project's decoder and checks, as the joiner does
        if isinstance(ev, Impression):
            return {"imp": 1, "items": len(ev.items), "clicks": 0}
        if isinstance(ev, Watermark):
            return {"imp": 0, "items": 0, "clicks": 0}
        return {"imp": 0, "items": 0, "clicks": len(ev)}

    def merge(a: dict, b: dict) -> dict:
        return {"imp": a["imp"] + b["imp"], "items": a["items"] + b["items"],
                "clicks": a["clicks"] + b["clicks"]}

    def emit(win: dict, key, ts, headers) -> bytes:
        v = win["value"]
        return msgpack.packb({"rid": key, "items": v["items"], "clicks": v["clicks"]})

    gap_ms = int(args.window_s * 1000)
    sdf = app.dataframe(imp).concat(app.dataframe(act))
    sdf = sdf.apply(decode)
    sdf = (sdf.session_window(inactivity_gap_ms=gap_ms, grace_ms=5000)
           .reduce(reducer=merge, initializer=lambda v: dict(v), merger=merge)
           .final(closing_strategy="partition"))
    sdf = sdf.apply(emit, metadata=True)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()
