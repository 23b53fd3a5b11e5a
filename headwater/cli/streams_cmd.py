"""Streams commands: ``broker``, ``join``, ``generate``, ``replay``, ``produce``."""

from __future__ import annotations

import argparse
import logging

from headwater.cli.runtime import stop_on_signals
from headwater.config import add_config_args, load_config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from streams.broker import BrokerConfig

    p = sub.add_parser("broker", help="run the embedded Tansu Kafka broker on 127.0.0.1")
    add_config_args(p, BrokerConfig)
    p.set_defaults(handler=_broker)


def _broker(args: argparse.Namespace) -> int:
    from streams.broker import BrokerConfig, EmbeddedBroker

    cfg = load_config(BrokerConfig, args, section="broker")
    stop = stop_on_signals()
    with EmbeddedBroker(cfg) as broker:
        log.info("broker ready on %s; topics %s", broker.bootstrap_servers, broker.topics.all())
        print(f"bootstrap_servers={broker.bootstrap_servers}", flush=True)
        while not stop.wait(0.5):
            if not broker.alive():
                log.error("broker exited: %s", broker.log_tail())
                return 1
    return 0
