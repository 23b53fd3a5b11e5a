"""``headwater demo``: every component as a supervised process, with a live terminal view."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from headwater.cli.runtime import print_json, stop_on_signals
from headwater.config import add_config_args, load_config
from headwater.demo import DemoConfig, DemoMonitor, run_demo
from headwater.supervisor import ChildFailed
from streams.events import SchemaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole platform locally with a live view")
    add_config_args(p, DemoConfig)
    p.add_argument("--duration", dest="duration_s", default=None, help="alias of --duration-s")
    p.add_argument("--json", action="store_true", help="no live view; one JSON summary line at the end")
    p.set_defaults(handler=_demo)


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _view(monitor: DemoMonitor, row: dict, dashboard_port: int) -> Table:
    title = "Headwater demo (Ctrl-C stops)"
    if dashboard_port:
        title += f"  dashboard: http://127.0.0.1:{dashboard_port}/"
    table = Table(title=title, show_header=False)
    source = "replayed, joined" if monitor.replay else "generator"
    table.add_row(f"events/s ({source})", _fmt(monitor.rate("events"), ".0f"))
    table.add_row("examples/s (joiner)", _fmt(monitor.rate("examples"), ".0f"))
    table.add_row("trained/s", _fmt(monitor.rate("trained"), ".0f"))
    table.add_row("prequential AUC (window)", _fmt(row["auc_window"]))
    table.add_row("ground-truth AUC (window)", _fmt(row["auc_truth"]))
    table.add_row("log loss (window)", _fmt(row["logloss_window"]))
    table.add_row("model version (serving)", _fmt(row["model_version"], ".0f"))
    table.add_row("freshness trainer->serving (ms)", _fmt(row["freshness_ms"], ".0f"))
    table.add_row("serving p99 (ms, last 500 calls)", _fmt(row["serving_p99_ms"], ".1f"))
    table.add_row("events / examples / dlq",
                  f"{row['events']:.0f} / {row['examples']:.0f} / {row['dlq']:.0f}")
    return table


def _demo(args: argparse.Namespace) -> int:
    cfg = load_config(DemoConfig, args, section="demo")
    stop = stop_on_signals()
    try:
        if args.json:
            print_json(run_demo(cfg, stop))
            return 0
        console = Console()
        with Live(console=console, refresh_per_second=2) as live:
            summary = run_demo(cfg, stop,
                               on_sample=lambda m, row: live.update(_view(m, row, cfg.dashboard_port)))
        console.print(summary)
        return 0
    except SchemaError as exc:  # a --dataset log that cannot be replayed as asked
        sys.stderr.write(f"headwater demo: {exc}\n")
        return 2
    except ChildFailed as exc:
        sys.stderr.write(f"headwater demo: {exc}{_tail(exc.log_file)}\n")
        return 1


def _tail(log_file: Path | None, lines: int = 15) -> str:
    """The end of a failed child's log, which says why it failed (a replay: file, line, column)."""
    if log_file is None or not log_file.exists():
        return ""
    text = log_file.read_text(errors="replace").rstrip().splitlines()[-lines:]
    return f"; the end of {log_file}:\n" + "\n".join(text)
