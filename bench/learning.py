"""``headwater bench learning --json``: does the learner learn this stream, and beat simple models?

Prequential (predict, then learn), each example once, in event-time order, through the same
:class:`~training.learner.Learner` the trainer runs (default :class:`TrainerConfig`; every
learning field is a flag here too), with online baselines scored on the very same examples in
the same run (:mod:`training.baselines`): ``counting`` (smoothed per-user and per-item log-odds)
and ``vw`` (Vowpal Wabbit logistic regression over every slot; ``--no-vw`` leaves it out).

Two sources, one loop (:mod:`training.prequential`):

- ``--dataset FILE`` (CSV, TSV, Parquet or JSON Lines): a real log, read by
  :func:`streams.log_reader.encode_log` with ``--schema FILE.toml`` and/or the column-name flags
  (columns the schema does not describe are inferred), as the examples the joiner would build;
- without it, the synthetic world of ``headwater demo`` (one run per ``--seeds`` entry), which
  also reports the hidden truth's AUC on the same examples.

Output (a contract): ``examples``, ``auc_overall``, ``auc_last_window`` (AUC over the last 10%
of the examples in time order), ``logloss``, ``examples_per_s`` (the learner's own time only),
``baselines: {"counting": {auc_overall, auc_last_window, logloss}, "vw": {...}}``, plus
``bench``, ``dataset``, ``seconds``, ``positives_rate``. On the generator these are the means
over seeds (``examples`` the sum), per-seed figures are under ``runs``, and ``max_auc_gap`` /
``mean_auc_gap`` are truth minus learner on the last 10% (each run also gives
``auc_gap_eval_window``, the gap on its last ``--eval-window`` examples, the older figure).

A learning curve has no physical ceiling; where the truth is known (the generator) its AUC on the
same examples is the ceiling: ``ceiling_auc`` = ``auc_truth_overall`` and ``fraction_of_ceiling``
= ``auc_overall`` / ``auc_truth_overall``. On a log the ceiling is null. ``--repeats N`` runs the
generator on seeds 0 .. N-1 (``--seeds`` lists them instead); ``--seed`` is the learner's own
(``TrainerConfig.seed``: table and tower initialisation), as for the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from bench.harness import Ceiling, add_common, no_ceiling, with_ceiling

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]

# TrainerConfig fields that do not change what is learned (Kafka, sync, checkpoints, metrics),
# or that the bench sets itself: no flag for them here.
_NOT_LEARNING = {"model_id", "group_id", "max_batch_wait_ms", "fetch_max_wait_ms", "publish",
                 "sparse_sync_interval_s", "dense_sync_interval_s", "snapshot_interval_s",
                 "sync_fp16", "params_message_bytes", "num_param_shards", "checkpoint_dir",
                 "checkpoint_interval_s", "eval_window", "max_examples", "idle_exit_s",
                 "metrics_port", "expire_interval_s"}


_LOG_ACTION_DELAY_S = 30.0  # --emit on a log: clicks follow within this (the generator's default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="a log to run (CSV, TSV, Parquet or JSON Lines); "
                   "default: the synthetic generator")
    p.add_argument("--schema", default=None, help="schema TOML of --dataset (see replay --inspect)")
    for name in ("user", "item", "label", "time"):
        p.add_argument(f"--{name}-col", default=None, help=f"{name} column of --dataset")
    p.add_argument("--time-format", default=None, help="strptime format of the time column, e.g. "
                   "'%%m/%%d/%%Y %%H:%%M' (default: the schema's, else epoch s/ms or ISO-8601, else guessed)")
    p.add_argument("--item-table", default=None, help="item attributes table of --dataset, joined on "
                   "the item id (see docs/real-logs.md)")
    p.add_argument("--item-table-key", default=None,
                   help="the --item-table's id column (default: the item column)")
    p.add_argument("--user-table", default=None, help="user attributes table of --dataset, joined on "
                   "the user id (see docs/real-logs.md)")
    p.add_argument("--user-table-key", default=None,
                   help="the --user-table's id column (default: the user column)")
    p.add_argument("--negatives", type=int, default=None, help="sampled negatives per positive row, for a log of positives only (purchases, plays); default: the schema's, 4 for a log without a label column")
    p.add_argument("--on-bad-row", choices=("error", "dead-letter"), default="error",
                   help="a bad row of --dataset stops the run (error) or is counted and skipped")
    p.add_argument("--no-vw", action="store_true", help="leave out the Vowpal Wabbit baseline")
    p.add_argument("--vw-args", default="", help="more Vowpal Wabbit arguments for its baseline, e.g. "
                   "'-q ui' (user x item pairs: a namespace is its slot's first letter) or '--lrq ui8'")
    p.add_argument("--counting-prior", type=float, default=10.0,
                   help="Beta prior strength (rows) of the counting baseline")
    p.add_argument("--events", type=int, default=300_000, help="generated events (shown items + clicks)")
    p.add_argument("--seeds", default=None, help="comma list: one generator run per seed "
                   "(default: 0 .. --repeats - 1, i.e. 0,1,2)")
    p.add_argument("--eval-window", type=int, default=10_000, help="examples per prequential window")
    p.add_argument("--emit", choices=("off", "window", "early", "both"), default="off",
                   help="also compare the joiner's emissions on the generator or --dataset "
                   "(bench/delayed.py): window, early (+FNW and uncorrected) or both, under "
                   "`delayed` in the JSON")
    p.add_argument("--join-window-s", type=float, default=10.0, help="with --emit: join window")
    p.add_argument("--early-hold-s", type=float, default=1.0, help="with --emit: early hold")
    p.add_argument("--max-action-delay-s", type=float, default=None,
                   help="clicks follow within this delay: the generator's (default 30), and with "
                   "--emit on a --dataset its clicks' (uniform, seeded; default 30)")
    p.add_argument("--users", type=int, default=None)
    p.add_argument("--items", type=int, default=None)
    p.add_argument("--segments", type=int, default=None)
    p.add_argument("--categories", type=int, default=None)
    _add_trainer_flags(p)  # before the common flags: its --seed (the learner's) is the --seed
    add_common(p, repeats=3, repeats_help="generator runs, on seeds 0 .. N-1")


def _add_trainer_flags(p: argparse.ArgumentParser) -> None:
    """One flag per learning field of TrainerConfig (default: the TrainerConfig default)."""
    from training.config import TrainerConfig

    group = p.add_argument_group("learner (TrainerConfig; defaults as the trainer's)")
    for f in dataclasses.fields(TrainerConfig):
        if f.name in _NOT_LEARNING:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f"tc_{f.name}", default=None,
                               action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=f"tc_{f.name}", default=None, type=_parser(f.default),
                               metavar=f.name.upper(), help=help_text)


def _parser(default: Any) -> Callable[[str], Any]:
    if isinstance(default, tuple):
        elem = type(default[0]) if default else str
        return lambda s: tuple(elem(x) for x in s.split(",") if x.strip())
    return type(default)


def trainer_config(args: argparse.Namespace) -> Any:
    """The TrainerConfig the bench runs: the defaults, changed by the learner flags given."""
    from training.config import TrainerConfig

    changes = {k[3:]: v for k, v in vars(args).items() if k.startswith("tc_") and v is not None}
    cfg = TrainerConfig(**{**changes, "eval_window": args.eval_window, "publish": False})
    cfg.validate()
    return cfg


def _baselines(args: argparse.Namespace) -> list:
    from training.baselines import CountingBaseline, VowpalWabbitBaseline

    out: list = [CountingBaseline(prior=args.counting_prior)]
    if not args.no_vw:
        out.append(VowpalWabbitBaseline(extra_args=args.vw_args))
    return out


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int | None], Callable[[int], None]]]:
    """``task(description, total) -> advance(done)``: a rich bar on stderr, or no-ops."""
    if not enabled:
        yield lambda _d, _t: (lambda _n: None)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), transient=True,
                  console=Console(stderr=True)) as progress:
        def task(description: str, total: int | None) -> Callable[[int], None]:
            tid = progress.add_task(description, total=total)
            return lambda n: progress.update(tid, completed=n)
        yield task


def run(args: argparse.Namespace) -> dict:
    cfg = trainer_config(args)
    with _progress(not getattr(args, "json", False)) as task:
        out = _run_dataset(args, cfg, task) if args.dataset else _run_generator(args, cfg, task)
    truth = out.get("auc_truth_overall")
    if truth is None:
        ceiling = no_ceiling("none: a log has no known truth, and learning has no physical ceiling; "
                             "compare with the baselines", "AUC")
    else:
        ceiling = Ceiling(truth, "AUC", measured=out["auc_overall"], note=(
            "the hidden truth's AUC on the same examples (the generator knows each click's "
            "probability); fraction = learner AUC / truth AUC, overall"))
    return with_ceiling(out, ceiling, named="ceiling_auc", digits=4)


def _seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds:
        return [int(s) for s in args.seeds.split(",")]
    return list(range(max(1, args.repeats)))


def _check_both_labels(path: str, encoded) -> None:
    """A log whose examples are all positives (or all negatives) has nothing to rank: say so
    rather than print an AUC of null."""
    import numpy as np

    from streams.wire import SchemaError

    labels = np.unique(encoded.label)
    if len(encoded) and len(labels) == 1:
        what = "positive" if labels[0] > 0 else "negative"
        merged = (f"; {encoded.duplicate_rows} rows were merged as repeats of one user, item and time: is "
                  f"{encoded.schema.item_col!r} the item?" if encoded.duplicate_rows else "")
        raise SchemaError(f"{path}: every one of its {len(encoded)} examples is a {what}, so there is nothing "
                          f"to rank (label {encoded.schema.label_col!r}){merged}; check what replay --inspect "
                          "guessed")


def _run_dataset(args: argparse.Namespace, cfg: Any, task: Callable) -> dict:
    from streams.log_infer import schema_for
    from streams.log_reader import encode_log, source_name
    from streams.log_schema import LogSchema
    from training.prequential import run_log

    t0 = time.perf_counter()
    done = task(f"reading {args.dataset}", None)
    overrides = LogSchema.from_toml(args.schema) if args.schema else None
    schema = schema_for(args.dataset, overrides, user_col=args.user_col, item_col=args.item_col,
                        label_col=args.label_col, time_col=args.time_col, time_format=args.time_format,
                        items_file=args.item_table, items_key=args.item_table_key, users_file=args.user_table,
                        users_key=args.user_table_key, negatives=args.negatives)
    encoded = encode_log(args.dataset, schema, on_bad_row=args.on_bad_row)
    _check_both_labels(args.dataset, encoded)
    # The trainer's defaults on a log: user x item-side crosses (unless --crosses is given), and
    # the schema's pooling of its multi-valued columns.
    cfg = cfg.for_log(schema, crosses=getattr(args, "tc_crosses", None))
    done(len(encoded))
    read_s = time.perf_counter() - t0
    log.info("%s: %d rows encoded in %.1fs", args.dataset, len(encoded), read_s)
    res = run_log(encoded, source_name(args.dataset), cfg, _baselines(args),
                  on_progress=task("prequential", len(encoded)))
    out = {"bench": "learning", "dataset": str(args.dataset), **res.to_dict(),
            "seconds": round(time.perf_counter() - t0, 2), "read_seconds": round(read_s, 2),
            "bad_rows": len(encoded.bad_rows), "skipped_rows": encoded.skipped_rows,
            "duplicate_rows": encoded.duplicate_rows,
            "folded_engagements": encoded.folded_engagements,
            **({"vw_args": args.vw_args} if args.vw_args and not args.no_vw else {}),
            "batch_size": cfg.batch_size, "batch_warmup_rows": cfg.batch_warmup_rows,
            "slots": ["user_id", "item_id", *schema.user_slots(), *schema.item_slots()],
            "crosses": list(cfg.crosses), "pooling": cfg.pooling,
            **({"slot_pooling": list(cfg.slot_pooling)} if cfg.slot_pooling else {}),
            "dense_width": int(encoded.dense.shape[1])}
    if args.emit != "off":  # the log's clicks, delayed as the generator's are (bench.delayed)
        from bench.delayed import log_source

        delay_ms = int((args.max_action_delay_s if args.max_action_delay_s is not None
                        else _LOG_ACTION_DELAY_S) * 1000)
        source = log_source(encoded, source_name(args.dataset), int(args.join_window_s * 1000),
                            int(args.early_hold_s * 1000), delay_ms, seed=getattr(args, "tc_seed", None) or 0)
        out["delayed"] = {**_delayed(args, cfg, source), "max_action_delay_ms": delay_ms}
    return out


def _run_generator(args: argparse.Namespace, cfg: Any, task: Callable) -> dict:
    from dataclasses import replace

    from streams.generator import GeneratorConfig
    from training.prequential import run_prequential

    world = GeneratorConfig()
    changes = {k: getattr(args, k) for k in ("users", "items", "segments", "categories")
               if getattr(args, k) is not None}
    if args.max_action_delay_s is not None:
        changes["max_action_delay_ms"] = int(args.max_action_delay_s * 1000)
    world = replace(world, **changes)
    seeds = _seeds(args)
    runs = []
    for seed in seeds:
        res = run_prequential(replace(world, seed=seed), cfg, args.events,
                              on_progress=task(f"seed {seed}", args.events),
                              baselines=_baselines(args))
        assert res.stream is not None
        d = res.stream.to_dict()
        d.update(seed=seed, events=res.events,
                 auc_gap=round(d["auc_truth_last_window"] - d["auc_last_window"], 4),
                 auc_last_eval_window=round(res.auc_last_window, 4),
                 auc_truth_last_eval_window=round(res.auc_truth_last_window, 4),
                 auc_gap_eval_window=round(res.auc_gap, 4))
        runs.append(d)
    gaps = [r["auc_gap"] for r in runs]
    learner_s = sum(r["examples"] / r["examples_per_s"] for r in runs)
    out = {"bench": "learning", "dataset": None, "events": args.events, "seeds": seeds,
           "examples": sum(r["examples"] for r in runs),
           **{k: _mean(runs, k) for k in ("auc_overall", "auc_last_window", "logloss",
                                          "auc_truth_overall", "auc_truth_last_window", "gauc", "gauc_truth")},
           "examples_per_s": round(sum(r["examples"] for r in runs) / learner_s, 1),
           "baselines": {name: {k: _mean([r["baselines"][name] for r in runs], k)
                                for k in ("auc_overall", "auc_last_window", "logloss", "gauc")}
                         for name in runs[0]["baselines"]},
           "max_auc_gap": max(gaps), "mean_auc_gap": round(sum(gaps) / len(gaps), 4),
           "positives_rate": _mean(runs, "positives_rate", 5),
           "seconds": round(sum(r["seconds"] for r in runs), 2), "batch_size": cfg.batch_size,
           "runs": runs,
           "world": {"users": world.users, "items": world.items, "dim": world.dim,
                     "segments": world.segments, "categories": world.categories,
                     "user_noise": world.user_noise, "item_noise": world.item_noise,
                     "temperature": world.temperature}}
    if args.emit != "off":
        from bench.delayed import generator_source

        window_ms, hold_ms = int(args.join_window_s * 1000), int(args.early_hold_s * 1000)
        source = generator_source(replace(world, seed=seeds[0]), args.events, window_ms, hold_ms)
        out["delayed"] = {**_delayed(args, cfg, source), "seed": seeds[0],
                          "max_action_delay_ms": world.max_action_delay_ms}
    return out


def _delayed(args: argparse.Namespace, cfg: Any, source: Any) -> dict:
    """``--emit``: the arms of :mod:`bench.delayed` on ``source``, under ``delayed``."""
    from bench.delayed import ARMS, run_arms

    arms = {"window": ARMS[:1], "early": ARMS[1:], "both": ARMS}[args.emit]
    if getattr(args, "tc_early_label_wait_s", None) is None:  # a label is final at window close
        cfg = dataclasses.replace(cfg, early_label_wait_s=args.join_window_s)
    return {"arms": run_arms(source, cfg, arms, int(args.join_window_s * 1000)),
            "join_window_s": args.join_window_s, "early_hold_s": args.early_hold_s}


def _mean(rows: list[dict], key: str, digits: int = 4) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(values) / len(values), digits) if values else None
