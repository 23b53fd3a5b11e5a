"""Today's joiner (streams.joiner.OnlineJoiner) under the same harness, for a same-run baseline.

    .venv/bin/python scripts/engine_eval/headwater_join.py BOOTSTRAP PREFIX GROUP STATE_DIR --stats F

Same settings as ``headwater bench streams`` (window 60 s, lateness 5 s); output is the usual
``<prefix>.examples`` (run_eval.py counts example ids there). One instance per group only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from streams.joiner import JoinerConfig, OnlineJoiner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    for a in ("bootstrap", "prefix", "group", "state_dir"):
        ap.add_argument(a)
    ap.add_argument("--stats", default="")
    ap.add_argument("--eos", action="store_true", help="(ignored)")
    args = ap.parse_args()
    cfg = JoinerConfig(bootstrap_servers=args.bootstrap, topic_prefix=args.prefix,
                       group_id=args.group, state_dir=args.state_dir, window_s=60,
                       allowed_lateness_s=5)
    joiner = OnlineJoiner(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    first = None
    try:
        while not stop.is_set():
            st = joiner.step(timeout_ms=50)
            if st.records and first is None:
                first = time.time()
                if args.stats:
                    Path(args.stats).write_text(json.dumps({"pid": os.getpid(), "first_input": first}))
    finally:
        joiner.close()


if __name__ == "__main__":
    main()
