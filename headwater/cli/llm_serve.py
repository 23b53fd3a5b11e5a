"""``headwater llm serve --model PATH``: the HTTP ranking and generation server.

Adds ``serve`` under the ``llm`` command (created here when no other module made it first), so
``headwater llm convert`` and ``headwater llm serve`` live side by side.
"""

from __future__ import annotations

import argparse
import logging

from headwater.cli.runtime import stop_on_signals
from headwater.config import add_config_args, load_config

log = logging.getLogger(__name__)


def _llm_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    parser = sub.choices.get("llm")
    if parser is None:
        parser = sub.add_parser("llm", help="LLM engine commands")
        return parser.add_subparsers(dest="llm_command", required=True, metavar="LLM_COMMAND")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="llm_command", required=True, metavar="LLM_COMMAND")


def register(sub: argparse._SubParsersAction) -> None:
    from llm_engine import EngineConfig
    from serving.http.config import HttpServerConfig

    parser = _llm_subparsers(sub).add_parser(
        "serve", help="serve /v1/rank and OpenAI-compatible /v1/completions over HTTP"
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder (see `headwater llm convert`)")
    add_config_args(parser, HttpServerConfig)
    add_config_args(parser, EngineConfig)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from llm_engine import EngineConfig
    from serving.http.config import HttpServerConfig
    from serving.http.engine_backend import EngineBackend
    from serving.http.server import serve_until

    config = load_config(HttpServerConfig, args, section="llm_serve")
    engine_config = load_config(EngineConfig, args, section="llm")
    stop = stop_on_signals()
    with Console(stderr=True).status(f"loading {args.model}"):
        backend = EngineBackend.from_model_dir(args.model, config.served_model_name, engine_config)
    try:
        from serving.http.app import create_app

        app = create_app(backend, config, special_tokens=backend.special_tokens)
        serve_until(app, config.host, config.port, stop)
    finally:
        backend.close()
    return 0
