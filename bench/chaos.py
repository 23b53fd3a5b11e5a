"""``headwater bench chaos --json``: kill the pipeline's processes and its broker mid-stream, count
the damage (the run itself is :func:`headwater.chaos.run.run_chaos`; its settings are
:class:`~headwater.chaos.run.ChaosConfig`'s flags, ``--config`` and ``HW_*``).

``--repeats N`` runs the whole thing N times, one after another; the JSON line is then the worst
run's report (fewest faults survived, then most events lost, then slowest recovery) with every
run's headline under ``runs``. There is no physical ceiling: the bar is absolute (every fault
survived, nothing lost), and the report says so in ``ceiling_note``.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.harness import add_common, no_ceiling, with_ceiling

__all__ = ["add_arguments", "run"]

_HEADLINE = ("faults_injected", "faults_survived", "lost", "duplicates_trained", "max_recovery_s",
             "max_downtime_s", "wall_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from headwater.chaos import ChaosConfig
    from headwater.config import add_config_args

    add_config_args(p, ChaosConfig)  # its --seed (the generator's) is the common --seed
    add_common(p, repeats=1, repeats_help="whole chaos runs, one after another (the worst is reported)")


def run(args: argparse.Namespace) -> dict:
    from rich.console import Console

    from headwater.chaos import ChaosConfig, run_chaos
    from headwater.config import load_config

    cfg = load_config(ChaosConfig, args, section="chaos")
    n = max(1, getattr(args, "repeats", 1))
    reports: list[dict[str, Any]] = []
    with Console(stderr=True).status("chaos") as status:
        for i in range(n):
            tag = f"chaos {i + 1}/{n}" if n > 1 else "chaos"
            reports.append(run_chaos(cfg, on_phase=lambda text, tag=tag: status.update(f"{tag}: {text}")))
    worst = min(reports, key=lambda r: (r["faults_survived"], -r["lost"], -r["max_recovery_s"]))
    out = {"bench": "chaos", **worst, "repeats": n}
    if n > 1:
        out["runs"] = [{k: r.get(k) for k in _HEADLINE} for r in reports]
    return with_ceiling(out, no_ceiling(
        "none: fault tolerance has an absolute bar (every fault survived, lost 0, no example "
        "trained twice), not a machine limit; recovery time is bounded by the restart and the "
        "consumer group's rejoin, which the report gives per fault"))
