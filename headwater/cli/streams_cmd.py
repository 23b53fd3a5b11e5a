"""Streams commands: ``broker``, ``join``, ``generate``, ``replay``, ``produce``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from headwater.cli.runtime import print_json, stop_on_signals
from headwater.config import ConfigError, add_config_args
from headwater.config import load_config as _load_config
from headwater.metrics import serve_metrics

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from streams.broker import BrokerConfig
    from streams.generator import GeneratorConfig
    from streams.joiner import JoinerConfig
    from streams.replay import ReplayConfig

    p = sub.add_parser("broker", help="run the embedded Tansu Kafka broker on 127.0.0.1")
    add_config_args(p, BrokerConfig)
    p.set_defaults(handler=_broker)

    p = sub.add_parser("join", help="online joiner: impressions + actions -> hw.examples")
    add_config_args(p, JoinerConfig)
    _metrics_flag(p)
    p.set_defaults(handler=_join)

    p = sub.add_parser("generate", help="synthetic feedback with a hidden ground-truth model")
    add_config_args(p, GeneratorConfig)
    _metrics_flag(p)
    p.set_defaults(handler=_generate)

    p = sub.add_parser("replay", help="replay a log (CSV, TSV, Parquet or JSON Lines: user_id,"
                                      "item_id,label,ts,features...) in event-time order")
    p.add_argument("file", type=Path)
    p.add_argument("--inspect", action="store_true",
                   help="print the inferred schema (TOML for --schema) and the log's counts; send nothing")
    add_config_args(p, ReplayConfig)
    p.set_defaults(handler=_replay)

    p = sub.add_parser("produce", help="produce events given as JSON lines on stdin (or a file)")
    p.add_argument("--json", action="store_true", required=True, help="input is JSON lines")
    p.add_argument("file", nargs="?", type=Path, help="JSON-lines file (default: stdin)")
    p.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    p.add_argument("--topic-prefix", default="hw")
    p.set_defaults(handler=_produce)


def load_config(cls, args: argparse.Namespace, section: str):
    """``headwater.config.load_config``, with a config's own ``validate`` errors made clear."""
    try:
        return _load_config(cls, args, section=section)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"[{section}] {exc}") from None


def _metrics_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here (0 = off)")


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    transient=True, console=None)


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


def _join(args: argparse.Namespace) -> int:
    from streams.joiner import JoinerConfig, OnlineJoiner

    cfg = load_config(JoinerConfig, args, section="joiner")
    serve_metrics(args.metrics_port)
    stop = stop_on_signals()
    joiner = OnlineJoiner(cfg)
    log.info("joiner consuming %s, %s -> %s (state %s)", joiner.topics.impressions,
             joiner.topics.actions, joiner.topics.examples, cfg.state_dir)
    totals = {"impressions": 0, "actions": 0, "examples": 0, "dlq": 0, "late": 0, "replayed_resolved": 0}
    last_report = [time.monotonic()]

    def count(stats) -> None:
        for k in totals:
            totals[k] += getattr(stats, k)
        if time.monotonic() - last_report[0] > 10:
            last_report[0] = time.monotonic()
            log.info("joiner: %s, watermark %d", totals, joiner.watermark)

    joiner.run(stop, on_step=count)
    log.info("joiner stopped: %s", totals)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from streams.generator import GeneratorConfig, produce_synthetic
    from streams.kafka_io import KafkaConfig, topic_names
    from streams.kafka_producer import BatchProducer

    cfg = load_config(GeneratorConfig, args, section="generator")
    serve_metrics(args.metrics_port)
    stop = stop_on_signals()
    producer = BatchProducer(KafkaConfig(bootstrap_servers=cfg.bootstrap_servers))
    try:
        with _progress() as progress:
            task = progress.add_task("generating", total=None)
            events, requests = produce_synthetic(
                cfg, producer, topic_names(cfg.topic_prefix), stop,
                on_progress=lambda n: progress.update(task, description=f"{n} events"))
    finally:
        producer.close()
    print_json({"events": events, "requests": requests})
    return 0


def _replay(args: argparse.Namespace) -> int:
    from streams.events import SchemaError
    from streams.item_features import ItemFeaturePublisher
    from streams.kafka_io import KafkaConfig, topic_names
    from streams.kafka_producer import BatchProducer
    from streams.log_reader import log_requests, source_name
    from streams.log_infer import infer_schema
    from streams.log_schema import LogSchema
    from streams.log_stats import inspection_toml
    from streams.replay import ReplayConfig, produce_dead_letters, produce_requests, read_log

    cfg = load_config(ReplayConfig, args, section="replay")
    try:
        if args.inspect:
            overrides = LogSchema.from_toml(cfg.schema) if cfg.schema else None
            schema, stats = infer_schema(args.file, overrides, **cfg.column_names())
            sys.stdout.write(inspection_toml(schema, stats))
            return 0
        encoded = read_log(args.file, cfg)  # every row checked before anything is sent
    except SchemaError as exc:
        log.error("%s", exc)
        return 2
    stop = stop_on_signals()
    topics = topic_names(cfg.topic_prefix)
    producer = BatchProducer(KafkaConfig(bootstrap_servers=cfg.bootstrap_servers))
    try:
        dead = produce_dead_letters(encoded.bad_rows, args.file, producer, topics)
        if dead:
            log.warning("replay: %d bad rows of %s dead-lettered to %s", dead, args.file, topics.dlq)
        schema = encoded.schema
        items = (ItemFeaturePublisher(producer, topics.items, schema.item_slots(),
                                      schema.item_dense_width(), texts=encoded.item_text)
                 if schema.item_slots() or schema.item_dense_width() or encoded.item_text else None)
        with _progress() as progress:
            task = progress.add_task("replaying", total=None)
            events = produce_requests(
                log_requests(encoded, source_name(args.file)), producer, topics, cfg.speed,
                cfg.final_watermark, stop,
                on_progress=lambda n: progress.update(task, description=f"{n} events"),
                items=items)
    finally:
        producer.close()
    sent_items = items.sent if items is not None else 0
    log.info("replay: %d rows, %d events sent, %d rows dead-lettered, %d item feature updates",
             len(encoded), events, dead, sent_items)
    print_json({"events": events, "dead_lettered": dead, "item_updates": sent_items})
    return 0


def _produce(args: argparse.Namespace) -> int:
    from streams.kafka_io import KafkaConfig, topic_names
    from streams.kafka_producer import BatchProducer
    from streams.replay import produce_json_lines

    producer = BatchProducer(KafkaConfig(bootstrap_servers=args.bootstrap_servers))
    try:
        if args.file:
            with open(args.file) as fh:
                sent, rejected = produce_json_lines(fh, producer, topic_names(args.topic_prefix))
        else:
            sent, rejected = produce_json_lines(sys.stdin, producer, topic_names(args.topic_prefix))
    finally:
        producer.close()
    print_json({"sent": sent, "rejected": rejected})
    return 1 if rejected else 0
