"""``headwater bench <what> --json``: each benchmark lives in its package and prints one JSON line.

A benchmark is a function ``run(args) -> dict`` plus ``add_arguments(parser)`` in the module named
here; the CLI prints the dict as the last line of output.
"""

from __future__ import annotations

import argparse
import importlib

from headwater.cli.runtime import print_json

BENCHMARKS: dict[str, str] = {
    # name: module defining add_arguments(parser) and run(args) -> dict
    "streams": "streams.bench",
    "embedding": "embedding_store.bench",
    "trainer": "training.bench_trainer",
    "freshness": "training.bench_freshness",
    "learning": "training.bench_learning",
    "serving": "serving.bench",
    "ps": "serving.ps_bench",
    "llm": "llm_engine.bench",
    "rank": "llm_engine.bench_rank",
    "spec": "llm_engine.bench_spec",
    "overload": "serving.http.bench_overload",
    "chaos": "headwater.chaos",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark; prints one JSON line")
    which = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    for name, module in BENCHMARKS.items():
        p = which.add_parser(name, help=f"benchmark: {name}")
        p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
        p.set_defaults(handler=_runner(module))
        importlib.import_module(module).add_arguments(p)


def _runner(module: str):
    def run(args: argparse.Namespace) -> int:
        result = importlib.import_module(module).run(args)
        print_json(result)
        return 0
    return run
