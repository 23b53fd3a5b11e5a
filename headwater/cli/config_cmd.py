"""``headwater config show``: the documented defaults of every process's config."""

from __future__ import annotations

import argparse
import importlib

from rich.console import Console
from rich.table import Table

from headwater.config import describe

# "module:Class" of each process config; packages add theirs here.
CONFIGS: dict[str, str] = {
    "broker": "streams.broker:BrokerConfig",
    "kafka": "streams.kafka_io:KafkaConfig",
    "joiner": "streams.joiner:JoinerConfig",
    "generator": "streams.generator:GeneratorConfig",
    "replay": "streams.replay:ReplayConfig",
    "demo": "headwater.demo:DemoConfig",
    "train": "training.config:TrainerConfig",
    "serve": "serving.config:ServeConfig",
    "param-server": "serving.param_server:ParamServerConfig",
    "llm": "llm_engine.config:EngineConfig",
    "llm_serve": "serving.http.config:HttpServerConfig",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="show configuration fields and defaults")
    parser.add_argument("action", choices=["show"])
    parser.add_argument("process", nargs="?", help="one process; all when omitted")
    parser.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    console = Console()
    for name, ref in CONFIGS.items():
        if args.process and args.process != name:
            continue
        module, cls = ref.split(":")
        table = Table(title=f"[{name}]  ({ref})")
        for col in ("field", "type", "default", "help"):
            table.add_column(col)
        for field, tp, default, help_text in describe(getattr(importlib.import_module(module), cls)):
            table.add_row(field, tp, repr(default), help_text)
        console.print(table)
    return 0
