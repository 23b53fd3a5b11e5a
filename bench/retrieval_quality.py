"""``headwater bench retrieval-quality --json``: does the two-tower retrieve the items users click?

Prequential in event time over one stream of example batches (the trainer's batches, each
example once): for every click in the evaluation part (the last ``--eval-fraction`` of the
examples), *before* its batch is learned, the top ``--k`` items among every item seen in earlier
batches are retrieved by

- ``two_tower``: the :class:`~training.two_tower.TwoTowerLearner`'s user vector (history: the
  user's clicks before the row's event time, earlier rows of the same batch included: they
  happened before it) dotted with its item vectors;
- ``ranker_embeddings``: what serving does today without candidates (:mod:`serving.retrieval`):
  the sum of the ranker's user-side rows (``user_id`` and the user-side slots) dotted with its
  ``item_id`` rows, the ranker learned by the trainer's :class:`~training.learner.Learner`
  (``..._no_counters`` leaves the rows' counter columns out of the dot);
- ``popular``: the ``--k`` items clicked most so far (the baseline).

Then both models learn the batch. A click is recalled when its item is in the top ``--k``;
``recall_at_100_*`` is the fraction of evaluated clicks recalled (a click on an item no earlier
batch showed cannot be recalled by any of them: ``clicks_on_new_items`` counts those).

Sources as in ``headwater bench learning``: the synthetic world (``--events``), or ``--dataset
FILE`` (``--schema F``) read by the same reader (:func:`streams.log_reader.encode_log`).
``examples_per_s`` is the two-tower learner's own throughput (its ``step`` time only).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from bench.harness import add_common, no_ceiling, with_ceiling
from bench.learning import _add_trainer_flags, _progress, trainer_config

log = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=None, help="a log (CSV, TSV, Parquet or JSON Lines); default: the generator")
    p.add_argument("--schema", default=None, help="schema TOML of --dataset (see replay --inspect)")
    for name in ("user", "item", "label", "time"):
        p.add_argument(f"--{name}-col", default=None, help=f"{name} column of --dataset")
    p.add_argument("--on-bad-row", choices=("error", "dead-letter"), default="error")
    p.add_argument("--events", type=int, default=300_000, help="generated events (shown items + clicks)")
    p.add_argument("--users", type=int, default=None, help="generator users")
    p.add_argument("--items", type=int, default=None, help="generator items")
    p.add_argument("--eval-fraction", type=float, default=0.2,
                   help="the clicks of this last fraction of the examples are evaluated")
    p.add_argument("--k", type=int, default=100, help="items retrieved per click")
    g = p.add_argument_group("two-tower (training.two_tower.TwoTowerConfig)")
    g.add_argument("--tt-dim", type=int, default=64)
    g.add_argument("--tt-hidden", type=int, default=128)
    g.add_argument("--tt-temperature", type=float, default=0.05)
    g.add_argument("--tt-lr", type=float, default=0.005)
    g.add_argument("--tt-init-std", type=float, default=0.1, help="std of new embedding rows")
    g.add_argument("--tt-history", type=int, default=20, help="recent clicks in the user tower (0: none)")
    g.add_argument("--tt-positives-per-step", type=int, default=256)
    g.add_argument("--tt-freq-alpha", type=float, default=None,
                   help="moving-average rate of the logQ frequency estimate (default: the config's)")
    g.add_argument("--tt-freq-estimator", choices=("gap", "count"), default=None,
                   help="logQ frequency estimate: gap (Yi et al.) or count (decayed click share)")
    g.add_argument("--tt-freq-decay", type=float, default=None, help="count estimate: per-step decay")
    g.add_argument("--no-logq", action="store_true", help="leave out the logQ correction")
    p.set_defaults(eval_window=50_000)  # trainer_config reads it
    _add_trainer_flags(p)
    add_common(p, repeats=1, repeats_help="unused: one prequential pass")


def _two_tower_config(args: argparse.Namespace, base: Any) -> Any:
    return replace(base, dim=args.tt_dim, hidden=args.tt_hidden, temperature=args.tt_temperature,
                   lr=args.tt_lr, init_std=args.tt_init_std, history_length=args.tt_history,
                   positives_per_step=args.tt_positives_per_step, logq=not args.no_logq,
                   seed=args.tc_seed or 0,
                   **{f: getattr(args, f"tt_{f}") for f in ("freq_alpha", "freq_estimator", "freq_decay")
                      if getattr(args, f"tt_{f}") is not None})


def _generator_batches(args: argparse.Namespace, task: Callable) -> tuple[list, Any, dict]:
    from streams.generator import GeneratorConfig, SyntheticStream
    from training.two_tower import TwoTowerConfig

    changes = {k: getattr(args, k) for k in ("users", "items") if getattr(args, k) is not None}
    world = replace(GeneratorConfig(), seed=args.tc_seed or 0, **changes)
    stream, seen, out = SyntheticStream(world), 0, []
    done = task("generating", args.events)
    while seen < args.events:
        block = stream.block(256)
        seen += stream.count_events(block)
        out.append(stream.examples(block))
        done(seen)
    return out, TwoTowerConfig.for_generator(), {"events": seen, "users": world.users, "items": world.items}


def _log_batches(args: argparse.Namespace, task: Callable) -> tuple[list, Any, dict, Any]:
    from streams.log_infer import schema_for
    from streams.log_reader import encode_log, log_examples, source_name
    from streams.log_schema import LogSchema
    from training.two_tower import TwoTowerConfig

    overrides = LogSchema.from_toml(args.schema) if args.schema else None
    schema = schema_for(args.dataset, overrides, user_col=args.user_col, item_col=args.item_col,
                        label_col=args.label_col, time_col=args.time_col)
    task(f"reading {args.dataset}", None)
    encoded = encode_log(args.dataset, schema, on_bad_row=args.on_bad_row)
    batches = list(log_examples(encoded, source_name(args.dataset)))
    return batches, TwoTowerConfig.for_log(schema), {"bad_rows": len(encoded.bad_rows)}, schema


_REPORTED = ("user_slots", "item_slots", "dim", "hidden", "temperature", "lr", "init_std",
             "history_length", "positives_per_step", "logq", "freq_estimator", "freq_alpha", "freq_decay")


def run(args: argparse.Namespace) -> dict:
    from training.prequential import _rebatch

    cfg = trainer_config(args)
    torch_threads = torch.get_num_threads()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    t0 = time.perf_counter()
    try:
        with _progress(not getattr(args, "json", False)) as task:
            if args.dataset:
                source, tt_base, info, schema = _log_batches(args, task)
                cfg = cfg.for_log(schema, crosses=getattr(args, "tc_crosses", None))
            else:
                source, tt_base, info = _generator_batches(args, task)
            batches = list(_rebatch(source, cfg.batch_size))
            tt_cfg = _two_tower_config(args, tt_base)
            res = _evaluate(batches, cfg, tt_cfg, args.k, args.eval_fraction,
                            task("prequential", sum(len(b) for b in batches)))
    finally:
        torch.set_num_threads(torch_threads)
    out = {"bench": "retrieval-quality", "dataset": args.dataset, **info, **res,
           "k": args.k, "eval_fraction": args.eval_fraction, "seconds": round(time.perf_counter() - t0, 2),
           "two_tower": {f: getattr(tt_cfg, f) for f in _REPORTED},
           "ranker": {"embedding_dim": cfg.embedding_dim, "counters": cfg.counters}}
    return with_ceiling(out, no_ceiling("none: recall of later clicks has no physical ceiling; "
                                        "compare with recall_at_100_popular", "recall"))


class _Recall:
    """Hits per retriever over the evaluated clicks."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.hits = dict.fromkeys(names, 0)
        self.clicks = 0

    def add(self, name: str, top: np.ndarray, items: np.ndarray) -> None:
        self.hits[name] += int((top == items[:, None]).any(1).sum())


def _top(scores: torch.Tensor, catalog: np.ndarray, k: int) -> np.ndarray:
    return catalog[torch.topk(scores, min(k, len(catalog)), dim=1).indices.numpy()]


def _ranker_query(learner: Any, clicks: Any, user_slots: tuple[str, ...]) -> torch.Tensor:
    """Serving's query without candidates: the sum of the user-side rows of each row's bags."""
    table, n = learner.table, len(clicks)
    out = table.lookup("user_id", torch.from_numpy(clicks.user_id)).clone()
    for s in user_slots:
        if s in table.slots and s in clicks.sparse:
            bag = clicks.sparse[s]
            out += table.lookup_bags(s, torch.from_numpy(bag.values),
                                     torch.from_numpy(bag.lengths.astype(np.int64)), mode="sum")[:n]
    return out


def _popular(clicked: list[np.ndarray], k: int) -> np.ndarray:
    """The ``k`` items clicked most so far (ties: the lower id)."""
    if not clicked:
        return np.zeros(0, np.int64)
    ids, counts = np.unique(np.concatenate(clicked), return_counts=True)
    return ids[np.argsort(-counts, kind="stable")[:k]].astype(np.int64)


@torch.no_grad()
def _retrieve(recall: _Recall, clicks: Any, catalog: np.ndarray, k: int, tt: Any, ranker: Any,
              counters: int, popular: np.ndarray) -> None:
    """Each retriever's top ``k`` of ``catalog`` for every click, scored into ``recall``."""
    items = clicks.item_id
    recall.clicks += len(clicks)
    u = tt.user_vectors_for(clicks)
    recall.add("two_tower", _top(u @ tt.item_vectors(catalog).T, catalog, k), items)
    rows = ranker.table.lookup("item_id", torch.from_numpy(catalog))
    query = _ranker_query(ranker, clicks, tt.cfg.user_slots)
    recall.add("ranker_embeddings", _top(query @ rows.T, catalog, k), items)
    d = rows.shape[1] - counters
    recall.add("ranker_embeddings_no_counters", _top(query[:, :d] @ rows[:, :d].T, catalog, k), items)
    recall.add("popular", np.broadcast_to(popular, (len(clicks), len(popular))), items)


def _evaluate(batches: list, cfg: Any, tt_cfg: Any, k: int, eval_fraction: float,
              progress: Callable[[int], None]) -> dict:
    from training.dedup import SeenFilter
    from training.learner import Learner
    from training.two_tower import TwoTowerLearner

    total = sum(len(b) for b in batches)
    eval_from = int(total * (1.0 - eval_fraction))
    tt, ranker, seen = TwoTowerLearner(tt_cfg), None, SeenFilter(cfg.dedup_capacity, generations=2)
    recall = _Recall(("two_tower", "ranker_embeddings", "ranker_embeddings_no_counters", "popular"))
    catalog, clicked, new_item_clicks = np.zeros(0, np.int64), [], 0
    done, ranker_s = 0, 0.0
    counters = 2 if cfg.counters else 0
    for batch in batches:
        keep = seen.filter_new(batch.example_id)
        batch = batch if keep.all() else batch.take(keep)
        if not len(batch):
            continue
        if ranker is None:
            ranker = Learner.for_batch(cfg, batch)
        clicks = batch.take(batch.label > 0)
        tt.remember(batch)  # histories: a row reads only clicks before its event time
        if done >= eval_from and len(clicks) and len(catalog):
            new_item_clicks += int((~np.isin(clicks.item_id, catalog)).sum())
            _retrieve(recall, clicks, catalog, k, tt, ranker, counters, _popular(clicked, k))
        t = time.perf_counter()
        ranker.train(batch)
        ranker_s += time.perf_counter() - t
        tt.learn(batch)
        catalog = np.union1d(catalog, batch.item_id)
        clicked.append(clicks.item_id)
        done += len(batch)
        progress(done)
    n = max(recall.clicks, 1)
    st = tt.stats
    log.info("two-tower: %d steps, %d positives trained, last loss %.3f", st.steps, st.trained, st.last_loss)
    return {"examples": done, "clicks_evaluated": recall.clicks,
            **{f"recall_at_{k}_{name}": round(h / n, 4) for name, h in recall.hits.items()},
            "clicks_on_new_items": new_item_clicks, "catalog_items": int(len(catalog)),
            "examples_per_s": round(st.examples / st.seconds, 1) if st.seconds else None,
            "ranker_examples_per_s": round(done / ranker_s, 1) if ranker_s else None,
            "two_tower_steps": st.steps, "two_tower_last_loss": round(st.last_loss, 4)}
