"""``headwater serve``: the gRPC recommender with its parameter-server replica, one PS shard, or a
recommender over a fleet of PS shards (``--role all|ps|recommender``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from headwater.cli.runtime import die_with_parent, stop_on_signals
from headwater.config import ConfigError, add_config_args, load_config, load_configs

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from serving.config import ServeConfig
    from serving.param_server import ParamServerConfig
    from serving.shard_fleet import PsClientConfig
    from streams.kafka_io import KafkaConfig

    p = sub.add_parser("serve", help="serve headwater.v1.Recommender over gRPC from a hw.params replica")
    add_config_args(p, KafkaConfig)
    add_config_args(p, ServeConfig)
    add_config_args(p, ParamServerConfig)
    add_config_args(p, PsClientConfig)
    _register_llm(p)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="--role ps: hold shard I of N (reads hw.params partition I); sets num_shards/shard_index")
    p.set_defaults(handler=_serve)


def _llm_classes() -> tuple[type, ...]:
    from serving.item_text import ItemTextConfig
    from serving.llm_runtime import LlmRuntimeConfig
    from serving.rerank import RerankConfig
    from serving.user_history import HistoryConfig

    return LlmRuntimeConfig, RerankConfig, ItemTextConfig, HistoryConfig


def _register_llm(p: argparse.ArgumentParser) -> None:
    """``--llm MODEL`` and the rerank stage's flags; the engine's own knobs as in `llm serve`."""
    from llm_engine import EngineConfig

    for cls in _llm_classes():
        add_config_args(p, cls)
    add_config_args(p, EngineConfig)


def _llm_runtime(args: argparse.Namespace, cfg, kafka):
    """The LLM side of ``serve --llm`` (None without --llm), started."""
    from llm_engine import EngineConfig
    from serving.llm_runtime import LlmRuntime
    from streams.kafka_io import topic_names

    try:
        llm_cfg, rerank_cfg, text_cfg, history_cfg = load_configs(_llm_classes(), args, section="serve")
        engine_cfg = load_config(EngineConfig, args, section="llm")
        llm_cfg.validate()
        rerank_cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not llm_cfg.llm:
        return None
    if cfg.role == "ps":
        raise ConfigError("--llm runs beside the recommender (--role all or recommender), not on a PS shard")
    from rich.console import Console

    with Console(stderr=True).status(f"loading the LLM from {llm_cfg.llm}"):
        runtime = LlmRuntime(llm_cfg, engine_cfg, rerank_cfg, text_cfg, history_cfg, host=cfg.host,
                             bootstrap_servers=kafka.bootstrap_servers,
                             actions_topic=topic_names(kafka.topic_prefix).actions,
                             items_topic=topic_names(kafka.topic_prefix).items)
    return runtime.start()


def _serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    from headwater.metrics import serve_metrics
    from paramsync import control_partition
    from serving.config import ServeConfig
    from serving.param_server import ParamServer, ParamServerConfig, parse_shard
    from serving.server import steady_gc
    from serving.shard_fleet import PsClientConfig, ShardFleet
    from streams.kafka_io import KafkaConfig, topic_names

    try:  # bad flags are a clear message and exit code 2, not a traceback
        kafka, cfg, ps_cfg, client_cfg = load_configs(
            (KafkaConfig, ServeConfig, ParamServerConfig, PsClientConfig), args, section="serve")
        cfg.validate()
        if args.shard:
            ps_cfg.shard_index, ps_cfg.num_shards = parse_shard(args.shard)
        if cfg.role == "all" and ps_cfg.num_shards > 1:
            raise ValueError("--role all holds the whole table; run shards with --role ps --shard i/N")
        addresses = client_cfg.addresses() if cfg.role == "recommender" else []
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.processes > 1:
        return _supervise(args.argv, cfg, ps_cfg.state_dir)
    if os.environ.get("HW_SERVE_SUPERVISOR_PID"):  # one of the processes of `serve --processes N`
        die_with_parent(int(os.environ["HW_SERVE_SUPERVISOR_PID"]))
    topic = topic_names(kafka.topic_prefix).params
    serve_metrics(cfg.metrics_port, cfg.host)
    stop = stop_on_signals()
    fleet = None
    if cfg.role == "recommender":
        fleet = ShardFleet(addresses, client_cfg.ps_deadline_ms / 1000.0, client_cfg.ps_batch_slots)
        ps_cfg.num_shards, ps_cfg.shard_index = fleet.num_shards, 0
        ps = ParamServer(ps_cfg, kafka.bootstrap_servers, topic, partition=control_partition(fleet.num_shards))
    else:
        ps = ParamServer(ps_cfg, kafka.bootstrap_servers, topic)
    ps.start()
    catalog = _catalog(cfg, kafka)
    llm = _llm_runtime(args, cfg, kafka)
    history, follower = _recent_history(cfg, kafka, llm)
    server = _server(cfg, ps, fleet, catalog, llm, history).start()
    steady_gc()
    console = Console(stderr=True)
    what = f"shard {ps_cfg.shard_index}/{ps_cfg.num_shards}" if cfg.role == "ps" else cfg.role
    console.print(f"[bold]headwater serve[/] ({what}) on {server.address}; following "
                  f"{topic}[{ps.partition}] at {kafka.bootstrap_servers}")
    if llm is not None:
        console.print(f"LLM rerank on ({llm.cfg.llm}, top {llm.stage.cfg.rerank_top_n}); "
                      f"HTTP endpoints: {llm.http_url or 'off'}")
    try:
        with console.status("waiting for the first snapshot on hw.params...") as status:
            while not stop.wait(0.5):
                if ps.error is not None:
                    log.error("parameter server failed: %s", ps.error)
                    return 1
                model = ps.current()
                if model is not None:
                    items = "" if catalog is None else f", {len(catalog)} items in the hw.items catalog"
                    status.update(f"serving model {model.model_id} version {model.version}, "
                                  f"freshness lag {ps.freshness_lag_ms() / 1000:.1f} s{items}")
    finally:
        server.stop()
        if llm is not None:
            llm.stop()
        ps.stop()
        if catalog is not None:
            catalog.stop()
        if follower is not None:
            follower.stop()
        if fleet is not None:
            fleet.close()
    return 0


def _catalog(cfg, kafka):
    """The hw.items follower of a recommender (``--items``, default on); None for a PS shard."""
    if not cfg.items or cfg.role == "ps":
        return None
    from serving.item_catalog import ItemCatalog, ItemCatalogConfig
    from streams.kafka_io import topic_names

    return ItemCatalog(ItemCatalogConfig(max_items=cfg.max_catalog_items), kafka.bootstrap_servers,
                       topic_names(kafka.topic_prefix).items).start()


def _supervise(argv: list[str], cfg, state_dir: str) -> int:
    """``--processes N``: N copies of this command on one port (see :mod:`serving.processes`)."""
    from rich.console import Console

    from headwater.metrics import serve_metrics
    from serving.processes import ServeProcesses

    stop = stop_on_signals()
    try:
        procs = ServeProcesses(argv, cfg.processes, cfg.host, cfg.port, state_dir=state_dir)
    except OSError as exc:
        raise ConfigError(f"cannot bind {cfg.host}:{cfg.port}: {exc}") from None
    console = Console(stderr=True)
    codes: list[int | None] = []
    try:
        serve_metrics(cfg.metrics_port, cfg.host, procs.registry())  # one /metrics for all of them
        procs.start()
        console.print(f"[bold]headwater serve[/] ({cfg.role}): {cfg.processes} processes on {procs.address}")
        with console.status("starting...") as status:
            while not stop.wait(0.5):
                procs.poll()
                status.update(f"{procs.alive()}/{cfg.processes} serving processes up on {procs.address}")
    finally:
        codes = procs.stop()
    # -SIGTERM: a child still starting (no handler yet) when the stop came; it had nothing to save.
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


def _recent_history(cfg, kafka, llm):
    """(history, its own follower or None) that fills recent_items (``--recent-items N``): the
    LLM runtime's live history when there is one, else one of its own on hw.actions."""
    if not cfg.recent_items or cfg.role == "ps":
        return None, None
    if llm is not None and llm.history is not None:
        return llm.history, None
    from serving.user_history import HistoryConfig, HistoryFollower, UserHistory
    from streams.kafka_io import topic_names

    hc = HistoryConfig()
    history = UserHistory(hc.history_users, hc.history_per_user, hc.history_ttl_s)
    follower = HistoryFollower(history, kafka.bootstrap_servers, topic_names(kafka.topic_prefix).actions,
                               hc.history_ttl_s).start()
    return history, follower


def _server(cfg, ps, fleet, catalog=None, llm=None, history=None):
    """The gRPC front of this role: Recommender (all, recommender) or ParameterServer (ps)."""
    from serving.ps_service import PsServer, PsServerConfig
    from serving.remote_table import ShardedModelSource
    from serving.server import RecommendServer

    if cfg.role == "ps":
        return PsServer(ps, PsServerConfig(host=cfg.host, port=cfg.port, workers=min(cfg.workers, 16)))
    return RecommendServer(cfg, ps if fleet is None else ShardedModelSource(ps, fleet), items=catalog, rerank=llm,
                           history=history)
