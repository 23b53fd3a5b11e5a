"""``headwater train``: the online trainer (hw.examples -> table + tower -> hw.params)."""

from __future__ import annotations

import argparse
import logging
import signal

from headwater.cli.runtime import print_json, stop_on_signals
from headwater.config import ConfigError, add_config_args, load_configs

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from streams.kafka_io import KafkaConfig
    from training.config import TrainerConfig

    p = sub.add_parser("train", help="run the online trainer on hw.examples")
    add_config_args(p, KafkaConfig)
    add_config_args(p, TrainerConfig)
    p.add_argument("--json", action="store_true",
                   help="no live view; print one JSON summary line at exit")
    p.add_argument("--nproc", type=int, default=0,
                   help="run N ranks (sharded table, DDP tower); 0 = one process, or the ranks "
                        "torchrun describes in RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT")
    p.set_defaults(handler=_train)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _train(args: argparse.Namespace) -> int:
    import os
    import sys

    if args.nproc < 0:
        raise SystemExit("headwater train: --nproc must be >= 0")
    # Bad flags fail here, before any rank starts; each rank process loads its own again.
    kafka, cfg = _configs(args, ranked=args.nproc >= 1 or "WORLD_SIZE" in os.environ)
    if args.nproc >= 1 and "WORLD_SIZE" not in os.environ:
        # The launcher: N copies of this very command, each with torchrun's variables.
        from training.distributed.env import headwater_argv, spawn_ranks

        codes = spawn_ranks(args.nproc, headwater_argv(_strip_nproc(sys.argv[1:])))
        return max(codes, key=abs)
    if "WORLD_SIZE" in os.environ:  # a rank (ours or torchrun's), even a world of one
        return _train_rank(args, kafka, cfg)
    return _train_one(args, kafka, cfg)


def _configs(args: argparse.Namespace, ranked: bool = False) -> tuple:
    """(KafkaConfig, TrainerConfig) of the command line; a bad ``--device`` (or one the ranks
    cannot use: they keep their shards on the CPU) is a ``ConfigError``, a sentence at start."""
    import torch

    from streams.kafka_io import KafkaConfig
    from training.config import TrainerConfig

    try:  # TrainerConfig.validate() checks the device (training.model.resolve_device)
        kafka, cfg = load_configs((KafkaConfig, TrainerConfig), args, section="train")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ranked and torch.device(cfg.device).type != "cpu":
        raise ConfigError(f"--device {cfg.device}: the multi-rank trainer (--nproc, torchrun) keeps "
                          "its table shards and tower on the CPU; use --device cpu or one process")
    return kafka, cfg


def _train_rank(args: argparse.Namespace, kafka, cfg) -> int:
    """One rank of a multi-rank trainer; rank 0 shows progress and prints the summary."""
    import torch.distributed as dist

    from headwater.metrics import serve_metrics
    from training.distributed.env import DistEnv, init_process_group
    from training.distributed.trainer import DistributedTrainer

    env = DistEnv.from_env()
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    serve_metrics(cfg.metrics_port + env.local_rank if cfg.metrics_port else 0)
    stop = stop_on_signals()
    init_process_group(env)
    try:
        trainer = DistributedTrainer(cfg, kafka, env)
        signal.signal(signal.SIGUSR1, lambda *_: trainer.request_dense())
        log.info("rank %d/%d training from %s.examples on %s (group %s)", env.rank,
                 env.world_size, kafka.topic_prefix, kafka.bootstrap_servers, cfg.group_id)
        if args.json or env.rank != 0:
            summary = trainer.run(stop)
            if env.rank == 0:
                print_json(summary)
            return 0
        return _live(trainer, stop)
    finally:
        dist.destroy_process_group()


def _train_one(args: argparse.Namespace, kafka, cfg) -> int:
    from headwater.metrics import serve_metrics
    from training.trainer import OnlineTrainer

    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    serve_metrics(cfg.metrics_port)
    stop = stop_on_signals()
    trainer = OnlineTrainer(cfg, kafka)
    # SIGUSR1: publish the dense tower at the next step (the "on demand" dense sync).
    signal.signal(signal.SIGUSR1, lambda *_: trainer.request_dense())
    log.info("training from %s.examples on %s (group %s)", kafka.topic_prefix,
             kafka.bootstrap_servers, cfg.group_id)
    if args.json:
        summary = trainer.run(stop)
        print_json(summary)
        return 0
    return _live(trainer, stop)


def _live(trainer, stop) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(stderr=True)
    with Live(_view({}), console=console, refresh_per_second=2, transient=False) as live:
        summary = trainer.run(stop, on_progress=lambda s: live.update(_view(s)))
        live.update(_view(summary))
    return 0


def _view(s: dict) -> str:
    if not s:
        return "[bold]headwater train[/]: waiting for examples..."
    ev = (s.get("eval") or {}).get("overall") or {}
    win = (s.get("eval") or {}).get("last_window") or {}

    def f(x: object) -> str:
        return f"{x:.4f}" if isinstance(x, float) else "-"
    return (f"[bold]trained[/] {s['examples_trained']:,}  ({s['examples_per_s']:,.0f}/s)  "
            f"dup {s['duplicates_skipped']:,}  bad {s['bad_messages']}\n"
            f"[bold]AUC[/] overall {f(ev.get('auc'))} (truth {f(ev.get('truth_auc'))})  "
            f"window {f(win.get('auc'))} (truth {f(win.get('truth_auc'))})  "
            f"logloss {f(ev.get('logloss'))}\n"
            f"[bold]table[/] v{s['table_version']}  published v{s['published_version']}  "
            f"checkpoints {s['checkpoints']}  watermark {s['watermark_ms']}")
