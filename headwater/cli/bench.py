"""``headwater bench <what> --json``: the benchmarks of the :mod:`bench` package, one JSON line each.

A benchmark is a module ``bench.<what>`` with ``add_arguments(parser)`` and ``run(args) -> dict``
(see :mod:`bench.harness`); the CLI prints the dict as the last line of output.
"""

from __future__ import annotations

import argparse

import bench
from bench.harness import emit


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark; prints one JSON line")
    which = parser.add_subparsers(dest="bench", required=True, metavar="WHAT")
    for name in bench.NAMES:
        module = bench.load(name)
        p = which.add_parser(name, help=f"benchmark: {name}", description=(module.__doc__ or "").split("\n\n")[0])
        module.add_arguments(p)  # with bench.harness.add_common: --json, --repeats, --seed
        p.set_defaults(handler=_runner(name))
    # The one bench whose command has a hyphen: its module is bench.retrieval_quality.
    from bench import retrieval_quality
    p = which.add_parser("retrieval-quality", help="benchmark: retrieval-quality",
                         description=(retrieval_quality.__doc__ or "").split("\n\n")[0])
    retrieval_quality.add_arguments(p)
    p.set_defaults(handler=lambda args: emit(retrieval_quality.run(args)) or 0)


def _runner(name: str):
    def run(args: argparse.Namespace) -> int:
        emit(bench.load(name).run(args))
        return 0
    return run
