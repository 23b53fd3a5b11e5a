"""The ``headwater`` console script: wires the packages into processes; holds no logic of its own.

Each module listed in ``COMMAND_MODULES`` has ``register(subparsers)`` adding its sub-commands;
a command's handler takes the parsed ``argparse.Namespace`` and returns an exit code.
Benchmarks register in :mod:`headwater.cli.bench`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from headwater.cli.runtime import exit_on_sigterm, keep_freed_memory
from headwater.config import ConfigError
from headwater.logs import setup_logging
from streams.wire import SchemaError

COMMAND_MODULES = [
    "headwater.cli.config_cmd",
    "headwater.cli.bench",
    "headwater.cli.demo",
    "headwater.cli.streams_cmd",
    "headwater.cli.train",
    "headwater.cli.serve",
    "headwater.cli.params",
    "headwater.cli.llm",
    "headwater.cli.dashboard",
    "headwater.cli.llm_serve",  # after llm: adds `serve` to its subcommands
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwater", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ...")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # commands that start copies of themselves (serve --processes) re-use it
    setup_logging(args.log_level)
    keep_freed_memory()
    exit_on_sigterm()
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        parser.exit(2, f"headwater: {exc}\n")
    except SchemaError as exc:  # a log or schema that cannot be read as asked: no traceback
        parser.exit(2, f"headwater {args.command}: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
