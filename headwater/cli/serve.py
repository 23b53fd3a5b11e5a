"""``headwater serve``: the gRPC recommender with its parameter-server replica (or the PS alone)."""

from __future__ import annotations

import argparse
import logging
import time

from headwater.cli.runtime import stop_on_signals
from headwater.config import add_config_args, load_config

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from serving.config import ServeConfig
    from serving.param_server import ParamServerConfig
    from streams.kafka_io import KafkaConfig

    p = sub.add_parser("serve", help="serve headwater.v1.Recommender over gRPC from a hw.params replica")
    add_config_args(p, KafkaConfig)
    add_config_args(p, ServeConfig)
    add_config_args(p, ParamServerConfig)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from headwater.metrics import serve_metrics
    from serving.config import ServeConfig
    from serving.param_server import ParamServer, ParamServerConfig
    from serving.server import RecommendServer
    from streams.kafka_io import KafkaConfig, topic_names

    kafka = load_config(KafkaConfig, args, section="serve")
    cfg = load_config(ServeConfig, args, section="serve")
    ps_cfg = load_config(ParamServerConfig, args, section="serve")
    cfg.validate()
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.role == "ps":
        cfg.batching = False  # a PS process answers GetEmbeddings / health; no ranking traffic
    serve_metrics(cfg.metrics_port, cfg.host)
    stop = stop_on_signals()
    ps = ParamServer(ps_cfg, kafka.bootstrap_servers, topic_names(kafka.topic_prefix).params)
    ps.start()
    server = RecommendServer(cfg, ps).start()
    console = Console(stderr=True)
    console.print(f"[bold]headwater serve[/] ({cfg.role}) on {server.address}; following "
                  f"{topic_names(kafka.topic_prefix).params} at {kafka.bootstrap_servers}")
    try:
        with console.status("waiting for the first snapshot on hw.params...") as status:
            while not stop.wait(0.5):
                if ps.error is not None:
                    log.error("parameter server failed: %s", ps.error)
                    return 1
                model = ps.current()
                if model is not None:
                    status.update(f"serving model {model.model_id} version {model.version}, "
                                  f"freshness lag {ps.freshness_lag_ms() / 1000:.1f} s")
    finally:
        server.stop()
        ps.stop()
    return 0
