"""Quix Streams version of the joiner, minimal: key = request id, state = the pending request
(impression + its clicks) in a session window per key, emitted once when the window closes.

    /tmp/engine_venv/bin/python scripts/engine_eval/quix_join.py BOOTSTRAP PREFIX GROUP STATE_DIR \
        [--eos] [--window-s 60]

Input: ``<prefix>.impressions`` and ``<prefix>.actions`` (project wire format, keyed by request
id, message timestamp = event time; see common.py); output: ``<prefix>.joined``. Partition
assignment, RocksDB state + changelog topics, restore and offset commits are Quix Streams'.
A tumbling event-time window per key stands in for "impression time + window";
``final(closing_strategy="partition")`` emits it when the partition's event time passes its end
+ grace (the end-of-stream watermark message closes the rest). Epoch-aligned windows split a
request whose click crosses a boundary into two outputs; the checker sums parts per request.
(A session window would be the natural fit, but its partition-wide close sweeps every key.)
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
    ap.add_argument("--grace-ms", type=int, default=35_000,
                    help="partition event time runs ahead by the click delay (clicks up to 30 s "
                         "after their impression share the partition): grace must cover it")
    ap.add_argument("--one-per-batch", action="store_true",
                    help="producer batch.num.messages=1: Tansu 0.6 reports a partition's high "
                         "watermark as the last *batch's* base offset + 1, so a multi-message "
                         "changelog batch makes Quix's restore check fail "
                         "(InvalidStoreChangelogOffset) on rebalance")
    ap.add_argument("--window", choices=("tumbling", "session"), default="tumbling",
                    help="session: O(keys) sweep per message once windows start closing "
                         "(closing_strategy=partition), unusable with one key per request")
    ap.add_argument("--stats", default="", help="write {pid, first_input} JSON here")
    args = ap.parse_args()

    app = Application(
        broker_address=args.bootstrap, consumer_group=args.group,
        auto_offset_reset="earliest", state_dir=args.state_dir, loglevel="WARNING",
        commit_interval=1.0,
        processing_guarantee="exactly-once" if args.eos else "at-least-once",
        # Tansu needs short group timeouts for prompt rebalances (as kafka-python does here)
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                               "max.poll.interval.ms": 300000},
        producer_extra_config={"compression.type": "lz4", "linger.ms": 5,
                               **({"batch.num.messages": 1} if args.one_per_batch else {})},
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
    if args.window == "session":
        win = sdf.session_window(inactivity_gap_ms=gap_ms, grace_ms=args.grace_ms)
        win = win.reduce(reducer=merge, initializer=lambda v: dict(v), merger=merge)
    else:  # epoch-aligned: a click past the boundary lands in the next window (a 2nd part)
        win = sdf.tumbling_window(duration_ms=gap_ms, grace_ms=args.grace_ms)
        win = win.reduce(reducer=merge, initializer=lambda v: dict(v))
    sdf = win.final(closing_strategy="partition")
    sdf = sdf.apply(emit, metadata=True)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()
