"""An early-emitted generator stream through the multi-rank learner: the stream, the learner,
and the rank worker (run as a script by ``spawn_ranks``: ``python sharded_early_helpers.py OUT``).

The stream is bench.delayed's (the joiner's own emission logic); a high click rate (base logit
0) makes the uncorrected stream's bias large: its label rate is p/(1+p), not p. Each call's rows
are split between the ranks at random, as the joiner's batches land on any partition, so a
positive copy is often read by another rank than its negative.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from training.evaluation import PrequentialEvaluator

ROWS = 256  # rows per call, all ranks together
WAIT_S = 2.0  # the join window: a label is final 2 s after its impression
WARM = 2_000  # the cold-start hold's warm-up (rows on final labels)
NOW = 1_000.0
EVENTS = 60_000


def _source(events: int = EVENTS):
    from bench.delayed import generator_source
    from streams.generator import GeneratorConfig

    world = replace(GeneratorConfig(), seed=3, users=200, items=100, max_action_delay_ms=5_000,
                    bias=0.0, request_interval_ms=50.0)
    return generator_source(world, events, window_ms=int(WAIT_S * 1000), hold_ms=200)


def early_stream():
    """The early stream's rows in emission order."""
    return _source()("early").batch


def split_stream(events: int = EVENTS):
    """(early rows, windowed rows: each emitted before the stream's last tenth, in emission
    order; the impressions of that last tenth on their final labels): train on one of the first
    two, score the third (serving's view, the truth known)."""
    early, window = _source(events)("early"), _source(events)("window")
    cut = int(np.quantile(window.batch.event_time_ms, 0.9))
    return (early.batch.take(np.flatnonzero(early.times < cut)),
            window.batch.take(np.flatnonzero(window.times < cut)),
            window.batch.take(np.flatnonzero(window.batch.event_time_ms >= cut)))


def calls(batch):
    """The stream in emission order, ``ROWS`` at a time."""
    for i in range(0, len(batch), ROWS):
        yield batch.take(np.arange(i, min(len(batch), i + ROWS)))


def rank_rows(rows, call: int, rank: int, world: int):
    """Rank ``rank``'s share of one call's rows (seeded: every rank draws the same split)."""
    if world == 1:
        return rows
    owner = np.random.default_rng(call).integers(0, world, len(rows))
    return rows.take(np.flatnonzero(owner == rank))


class Recorder(PrequentialEvaluator):
    """The learner's evaluator, keeping every scored row's logit and (final) label."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, logits, labels, *rest) -> None:
        self.logits.append(np.asarray(logits, np.float64).copy())
        self.labels.append(np.asarray(labels, np.float64).copy())
        super().update(logits, labels, *rest)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.logits), np.concatenate(self.labels)


def make_learner(first_rows, **kw):
    from training.config import TrainerConfig
    from training.learner import Learner

    cfg = TrainerConfig(publish=False, batch_size=ROWS, counters=False, init_std=0.0,
                        dense_precision="fp32", early_label_wait_s=WAIT_S,
                        early_warmup_examples=WARM, seed=1, **kw)
    learner = Learner.for_batch(cfg, first_rows)
    learner.evaluator = Recorder()
    return learner


def calibration(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean predicted probability over the positive rate (1 = calibrated)."""
    return float((1 / (1 + np.exp(-logits))).mean() / labels.mean())


def probe_logits(sl, probes):
    """Collective: the logits of ``probes`` (on rank 0; the others pass none) by the trained
    model, through the sharded lookup."""
    import torch

    ln = sl.learner
    n = len(probes)
    bags, _ = sl.sparse.lookup(probes.sparse, n, train=False, now=NOW)
    if not n:
        return np.zeros(0)
    dense = torch.from_numpy(probes.dense) if ln.model_cfg.dense_dim else None
    with torch.no_grad():
        return ln.logits(bags.emb, dense).numpy().astype(np.float64)


def _worker(out_dir: str, events: int = EVENTS) -> None:
    """Trains each arm (the windowed join; early with FNW; early uncorrected) at this rank and
    writes its probe scores (rank 0) and lockstep counts; the FNW arm also checkpoints in its
    warm-up. ``torchrun --nproc-per-node 2 sharded_early_helpers.py OUT 200000`` measures the
    figures docs/architecture.md quotes."""
    import torch

    from streams.events import ExampleBatch
    from training.distributed.checkpoint import ShardedCheckpointer
    from training.distributed.env import DistEnv, init_process_group
    from training.distributed.learner import ShardedLearner

    torch.set_num_threads(1)
    env = DistEnv.from_env()
    init_process_group(env, "gloo")
    out = Path(out_dir)
    early, window, probes = split_stream(events)
    for arm, batch in (("fnw", early), ("none", early), ("window", window)):
        correction = "none" if arm == "none" else "fnw"
        sl = ShardedLearner(make_learner(batch, early_correction=correction), env.rank, env.world_size)
        for call, rows in enumerate(calls(batch)):
            sl.train(rank_rows(rows, call, env.rank, env.world_size), now=NOW)
            if arm == "fnw" and call == 3:  # in the warm-up: the holds keep rows
                from streams.example_batch import decode_examples

                ShardedCheckpointer(out / "ckpt-warmup", env.rank, env.world_size).write(
                    sl.learner, {("hw.examples", env.rank): 10 + env.rank})
                held = decode_examples(sl.learner.cold_hold.state()[0]).example_id
                (out / f"held-rank{env.rank}.json").write_text(json.dumps(
                    {"held": held.tolist(), "final_trained": sl.learner.cold_hold.final_trained}))
        logits = probe_logits(sl, probes if env.rank == 0 else ExampleBatch.empty())
        if env.rank == 0:
            np.savez(out / f"{arm}-probes.npz", logits=logits, labels=probes.label)
        memory = sl.learner.early_memory
        (out / f"{arm}-rank{env.rank}.json").write_text(json.dumps(
            {"steps": sl.steps, "global_examples": sl.global_examples,
             "examples": sl.learner.examples_trained, "hits": memory.hits if memory else 0,
             "misses": memory.misses if memory else 0,
             "warm_at_ms": (sl.learner.cold_hold_stats or {}).get("warm_at_ms")}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], *map(int, sys.argv[2:3]))
