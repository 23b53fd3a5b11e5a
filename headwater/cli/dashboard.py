"""``headwater dashboard``: the live dashboard as its own small HTTP server (loopback by default)."""

from __future__ import annotations

import argparse
import logging
import socket
import threading

from headwater.cli.runtime import stop_on_signals
from headwater.config import add_config_args, load_config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from serving.dashboard import DashboardConfig

    p = sub.add_parser("dashboard", help="live charts of the components' /metrics in a browser page")
    add_config_args(p, DashboardConfig)
    p.set_defaults(handler=_dashboard)


def _dashboard(args: argparse.Namespace) -> int:
    import uvicorn
    from rich.console import Console

    from headwater.config import ConfigError
    from serving.dashboard import DashboardConfig, create_app

    try:
        cfg = load_config(DashboardConfig, args, section="dashboard")
        cfg.validate()
    except ConfigError:
        raise
    except ValueError as exc:  # the config's own validate(): a clear usage error, not a traceback
        raise ConfigError(f"dashboard: {exc}") from exc
    stop = stop_on_signals()
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(cfg.scraper()), log_level="warning",
                                           timeout_graceful_shutdown=2))
    server.install_signal_handlers = lambda: None  # stop_on_signals owns SIGTERM/SIGINT
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    Console(stderr=True).print(f"[bold]headwater dashboard[/] on http://{cfg.host}:{port}/ "
                               f"watching {cfg.sources or 'no sources'}")
    try:
        while not stop.wait(0.5) and thread.is_alive():
            pass
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    return 0
