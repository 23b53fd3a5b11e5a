"""``headwater bench learning --json``: how close the learner gets to the ground truth in N events.

The broker-free prequential run of :mod:`training.prequential` on the demo's synthetic world
(the generator's defaults, flags below change it). The baseline measured in the same run is the
ground-truth model's AUC on the very examples the learner was scored on; the figure of merit is
``auc_gap`` (truth minus learner) on the last window, the issue's target being < 0.03 within 300k
events.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=300_000, help="generated events (shown items + clicks)")
    p.add_argument("--seeds", default="0,1,2", help="comma list: one run per generator seed")
    p.add_argument("--eval-window", type=int, default=10_000, help="examples per prequential window")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--segments", type=int, default=None)
    p.add_argument("--categories", type=int, default=None)


def run(args: argparse.Namespace) -> dict:
    from dataclasses import replace

    from streams.generator import GeneratorConfig
    from training.config import TrainerConfig
    from training.prequential import run_prequential

    world = GeneratorConfig()
    changes = {k: getattr(args, k) for k in ("users", "items", "segments", "categories")
               if getattr(args, k) is not None}
    world = replace(world, **changes)
    cfg = TrainerConfig(eval_window=args.eval_window, publish=False)
    runs = [run_prequential(replace(world, seed=int(s)), cfg, args.events).to_dict()
            for s in args.seeds.split(",")]
    gaps = [r["auc_gap"] for r in runs]
    return {"bench": "learning", "events": args.events, "max_auc_gap": max(gaps),
            "mean_auc_gap": round(sum(gaps) / len(gaps), 4),
            "auc_last_window": [r["auc_last_window"] for r in runs],
            "auc_truth_last_window": [r["auc_truth_last_window"] for r in runs],
            "examples": [r["examples"] for r in runs],
            "seconds": round(sum(r["seconds"] for r in runs), 2),
            "world": {"users": world.users, "items": world.items, "dim": world.dim,
                      "segments": world.segments, "categories": world.categories,
                      "user_noise": world.user_noise, "item_noise": world.item_noise,
                      "temperature": world.temperature}}
