"""Drives one engine app against a fresh Tansu: preload input, run N instances, optional kill -9.

    /tmp/engine_venv/bin/python scripts/engine_eval/run_eval.py --engine quix \
        [--partitions 4] [--instances 2] [--kill-at 0.3] [--eos] [--events 1000000]

1. Tansu (in memory) on a free port; topics ``<prefix>.impressions|actions|joined``, P partitions.
2. The generator's messages (same bytes as ``headwater bench streams``) keyed by request id,
   produced up front (timed: ``produce_events_per_s``), then read back raw by kafka-python
   (``raw_consume_events_per_s``: the ceiling of any consumer of these bytes on this broker).
3. N instances of the engine app in one consumer group, separate state dirs (as on separate
   machines). ``events_per_s`` = input events / (last joined output - first input read).
4. ``--kill-at F``: when F of the requests have been emitted, SIGKILL instance 0; the rest must
   take over its partitions and pending state: ``lost`` and ``duplicates`` are counted on the
   output (one message per request id expected).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
ENGINES = {
    "quix": ["/tmp/engine_venv/bin/python", str(HERE / "quix_join.py")],
    "faust": ["/tmp/engine_venv/bin/python", str(HERE / "faust_join.py")],
    # today's joiner, project venv; output = <prefix>.examples (counted by example id)
    "headwater": [str(common.REPO / ".venv/bin/python"), str(HERE / "headwater_join.py")],
}


def load_messages(events: int):
    cache = Path(f"/tmp/engine_eval/msgs_{events}.msgpack")
    if cache.exists():
        out, n_events, n_requests, truth, last_t = msgpack.unpackb(cache.read_bytes(), raw=False)
        return [tuple(m) for m in out], n_events, n_requests, truth, last_t
    data = common.generator_messages(events)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(msgpack.packb(data, use_bin_type=True))
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=sorted(ENGINES), required=True)
    ap.add_argument("--partitions", type=int, default=1)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--kill-at", type=float, default=0.0)
    ap.add_argument("--eos", action="store_true")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--keep-logs", default="/tmp/engine_eval/logs")
    ap.add_argument("--extra", default="", help="extra args for the engine app (space separated)")
    args = ap.parse_args()

    messages, n_events, n_requests, truth, last_t = load_messages(args.events)
    broker = common.Tansu()
    prefix = f"ev-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="engine-eval-"))
    logs = Path(args.keep_logs) / f"{args.engine}-{prefix}"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    result: dict = {"engine": args.engine, "partitions": args.partitions,
                    "instances": args.instances, "eos": args.eos, "events": n_events,
                    "requests": n_requests, "messages": len(messages), "logs": str(logs)}
    try:
        broker.create([f"{prefix}.{t}" for t in ("impressions", "actions", "joined")],
                      args.partitions)
        if args.engine == "headwater":
            broker.create([f"{prefix}.{t}" for t in ("examples", "dlq", "late")], 1)
        produce_s = common.produce(broker.bootstrap, prefix, messages, last_t, args.partitions)
        result["produce_events_per_s"] = round(n_events / produce_s)
        raw_s = common.raw_consume(broker.bootstrap, prefix, len(messages))
        result["raw_consume_events_per_s"] = round(n_events / raw_s)

        reader = (common.ExamplesReader(broker.bootstrap, prefix) if args.engine == "headwater"
                  else common.JoinedReader(broker.bootstrap, prefix, read_committed=args.eos))
        group = f"{prefix}-joiner"
        for i in range(args.instances):
            cmd = ENGINES[args.engine] + [broker.bootstrap, prefix, group, str(tmp / f"state{i}"),
                                          "--stats", str(tmp / f"stats{i}.json")]
            if args.eos:
                cmd.append("--eos")
            cmd += args.extra.split()
            procs.append(subprocess.Popen(cmd, stdout=open(logs / f"inst{i}.log", "w"),
                                          stderr=subprocess.STDOUT, env=common.env_with_repo()))
        t_start = time.time()
        deadline = time.perf_counter() + args.timeout_s
        killed_at = None
        done = 0
        while done < n_requests and time.perf_counter() < deadline:
            if reader.poll(truth):
                done = reader.complete(truth)
            if args.kill_at and killed_at is None and len(reader.seen) >= args.kill_at * n_requests:
                os.kill(procs[0].pid, signal.SIGKILL)
                killed_at = len(reader.seen)
                result["killed_pid"] = procs[0].pid
                result["killed_after_joined"] = killed_at
                result["killed_at_s"] = round(time.time() - t_start, 2)
            if all(p.poll() is not None for p in procs):
                break
        reader.until(truth, 0, idle_s=5.0)  # catch late duplicates
        firsts = [json.loads((tmp / f"stats{i}.json").read_text())["first_input"]
                  for i in range(args.instances) if (tmp / f"stats{i}.json").exists()]
        result.update(reader.summary(truth))
        if firsts and reader.last:
            first = min(firsts)
            result["startup_s"] = round(first - t_start, 2)
            result["elapsed_s"] = round(reader.last - first, 2)
            result["events_per_s"] = round(n_events / (reader.last - first))
        result["exit_codes"] = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        result["broker_log_tail"] = broker.tail(600)
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
