"""``python -m bench.gpu_check [--out DIR] [--tiny] [--only a,b] [--perturb] [--require-targets]``

Prints one JSON line per check (and appends it to ``DIR/checks.jsonl``), then a ``summary`` line;
exits 1 when any check's figures disagree with its reference (or, with ``--require-targets``, a
GPU speed target of issue 22 is missed), 0 otherwise. Without CUDA it runs at tiny shapes with
Triton's interpreter, which it switches on itself before anything imports Triton.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.gpu_check import CHECKS
from bench.harness import add_threads

log = logging.getLogger("bench.gpu_check")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", default="gpu-check-out", help="folder for checks.jsonl and log.txt (default %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when there is one)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (automatic on the CPU)")
    p.add_argument("--only", default="", help=f"comma-separated checks to run (default all: {', '.join(CHECKS)})")
    p.add_argument("--perturb", action="store_true",
                   help="shift every reference beyond its tolerance: every check must then fail (tests the gate)")
    p.add_argument("--require-targets", action="store_true",
                   help="also exit 1 when a speed target of issue 22 is missed (never judged at tiny shapes)")
    p.add_argument("--repeats", type=int, default=0, help="timed rounds per figure (default: 3 tiny, 10 full)")
    p.add_argument("--seed", type=int, default=0)
    add_threads(p)
    args = p.parse_args(argv)
    args.only = [c for c in args.only.split(",") if c] or list(CHECKS)
    unknown = sorted(set(args.only) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}; checks: {', '.join(CHECKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch  # torch does not import Triton; the interpreter switch below must precede Triton

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        args.tiny = True
    elif os.environ.pop("TRITON_INTERPRET", None) == "1":  # compiled kernels, not interpreted, on a GPU
        print("gpu-check: ignoring TRITON_INTERPRET=1 on CUDA", file=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "checks.jsonl"
    jsonl.write_text("")
    handler = logging.FileHandler(out / "log.txt", mode="w")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), handler])
    from bench.gpu_check import check_function
    from bench.gpu_check.common import Setup, write_line

    t_start = time.perf_counter()
    lines = []
    with tempfile.TemporaryDirectory(prefix="hw-gpu-check-") as tmp:
        setup = Setup(torch.device(device), tiny=args.tiny, perturb=args.perturb, workdir=Path(tmp),
                      repeats=args.repeats or (3 if args.tiny else 10), seed=args.seed)
        for name in args.only:
            log.info("check %s", name)
            t0 = time.perf_counter()
            try:
                line = check_function(name)(setup)
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                log.error("check %s failed:\n%s", name, traceback.format_exc())
                line = {"check": name, "device": setup.device_name, "ok": False, "tiny": setup.tiny,
                        "error": f"{type(exc).__name__}: {exc}", "reference": None}
            line["seconds"] = round(time.perf_counter() - t0, 2)
            setup.release()
            write_line(line, jsonl)
            lines.append(line)
    missed = [f"{line['check']}.{k}" for line in lines if isinstance(line.get("targets"), dict)
              for k, t in line["targets"].items() if not t["met"]]
    failed = [line["check"] for line in lines if not line["ok"]]
    ok = not failed and not (args.require_targets and missed)
    write_line({"check": "summary", "device": lines[0]["device"] if lines else device, "ok": ok,
                "tiny": args.tiny, "failed": failed, "targets_missed": missed,
                "targets_required": args.require_targets, "perturbed": args.perturb,
                "seconds": round(time.perf_counter() - t_start, 2),
                "versions": _versions(torch), "reference": "every check above"}, jsonl)
    return 0 if ok else 1


def _versions(torch) -> dict:  # noqa: ANN001
    import triton
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
         "transformers": transformers.__version__}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
    return v


if __name__ == "__main__":
    sys.exit(main())
