"""Shared pieces of the multi-rank training tests: deterministic batches, a learner factory, and
the rank worker (run as a script by ``spawn_ranks``: ``python dist_train_helpers.py OUT CASE``).

Rows start at zero (``init_std=0``): the table draws a new row's random init from one generator
in creation order, so one process and two shards would draw *different* random rows for the
same id; with zero init both paths are deterministic, and the first step's gradient (through
the MLP) makes every row non-zero at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SLOTS = ("a", "b", "c")
DENSE_DIM = 3
NOW = 1_000.0
CASES = {
    "sum_adagrad": {"pooling": "sum", "sparse_optimizer": "adagrad", "sparse_lr": 0.1},
    "mean_ftrl": {"pooling": "mean", "sparse_optimizer": "ftrl", "sparse_lr": 0.1},
}


def global_batches(steps: int = 6, rows: int = 64, seed: int = 7) -> list:
    """Global batches with ragged bags (lengths 0..3), repeated ids, sample rates < 1, dense features."""
    from streams.events import ExampleBatch, Ragged

    rng = np.random.default_rng(seed)
    out = []
    for step in range(steps):
        sparse = {}
        for k, (slot, vocab, max_len) in enumerate((("a", 50, 3), ("b", 30, 1), ("c", 400, 2))):
            lengths = rng.integers(0 if max_len > 1 else 1, max_len + 1, rows).astype(np.int32)
            sparse[slot] = Ragged(rng.integers(0, vocab, int(lengths.sum())).astype(np.int64)
                                  + (k + 1) * 10**12, lengths)
        first = step * rows
        ids = np.arange(first, first + rows, dtype=np.int64)
        out.append(ExampleBatch(
            example_id=ids, user_id=sparse["b"].values.copy(), item_id=ids % 13,
            label=(rng.random(rows) < 0.3).astype(np.float32),
            sample_rate=rng.choice(np.array([1.0, 0.5, 0.25], np.float32), rows),
            event_time_ms=1_000 + ids, sparse=sparse,
            dense=rng.normal(size=(rows, DENSE_DIM)).astype(np.float32),
            truth_p=np.full(rows, np.nan, np.float32)))
    return out


def rank_share(batch, step: int, rank: int, world: int):
    """Rank ``rank``'s rows of a global batch: contiguous slices; at step 2 rank 0 gets them all
    (the other ranks train an empty batch, which must keep them in lockstep)."""
    n = len(batch)
    if step == 2:
        return batch.take(np.arange(n) if rank == 0 else np.zeros(0, np.int64))
    bounds = np.linspace(0, n, world + 1).astype(int)
    return batch.take(np.arange(bounds[rank], bounds[rank + 1]))


def make_learner(case: str):
    from training.config import TrainerConfig
    from training.learner import Learner, make_table, model_config_for

    cfg = TrainerConfig(embedding_dim=4, hidden=(8, 4), cross_layers=1, cross_rank=0, init_std=0.0,
                        dense_lr=0.01, seed=3, slots=SLOTS, dense_precision="fp32", counters=False,
                        **CASES[case])  # fp32: the comparison is to 1e-4, below bf16's rounding
    return Learner(cfg, model_config_for(cfg, SLOTS, DENSE_DIM), make_table(cfg, SLOTS))


def table_rows(table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every live row per slot, sorted by id: ``{slot: (ids, values)}``."""
    import torch

    out = {}
    for slot in table.slots:
        ids = np.sort(table.ids(slot))
        vals = table.lookup(slot, torch.from_numpy(ids)).numpy()
        out[slot] = (ids, vals)
    return out


def save_params(path: Path, learner) -> None:
    """Table rows and tower weights of one process as safetensors."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"tower.{k}": v.detach().clone() for k, v in learner.tower.state_dict().items()}
    for slot, (ids, vals) in table_rows(learner.table).items():
        tensors[f"ids.{slot}"] = torch.from_numpy(ids.copy())
        tensors[f"rows.{slot}"] = torch.from_numpy(vals.copy())
    save_file(tensors, str(path))


_RUNS: dict[str, Path] = {}


def two_rank_run(tmp_path_factory) -> Path:
    """The worker's output directory, run once per test session (the equivalence and the
    re-shard tests read the same 2-rank run)."""
    if "out" not in _RUNS:
        from training.distributed.env import spawn_ranks

        out = tmp_path_factory.mktemp("dist-two-ranks")
        codes = spawn_ranks(2, [sys.executable, str(Path(__file__).resolve()), str(out)],
                            timeout_s=240)
        assert codes == [0, 0], codes
        _RUNS["out"] = out
    return _RUNS["out"]


def _worker(out_dir: str) -> None:
    import torch

    from training.distributed.checkpoint import ShardedCheckpointer
    from training.distributed.env import DistEnv, init_process_group
    from training.distributed.learner import ShardedLearner

    torch.set_num_threads(1)
    env = DistEnv.from_env()
    init_process_group(env, "gloo")
    stats = {}
    for case in CASES:
        sl = ShardedLearner(make_learner(case), env.rank, env.world_size)
        for step, batch in enumerate(global_batches()):
            sl.train(rank_share(batch, step, env.rank, env.world_size), now=NOW)
        save_params(Path(out_dir) / f"{case}-rank{env.rank}.safetensors", sl.learner)
        # A sharded checkpoint of each case (collective): the re-shard tests restore it.
        ShardedCheckpointer(Path(out_dir) / f"ckpt-{case}", env.rank, env.world_size).write(
            sl.learner, {("hw.examples", env.rank): 10 + env.rank})
        stats[case] = {"exchange_calls": sl.timer.calls, "steps": sl.steps,
                       "global_examples": sl.global_examples}
    (Path(out_dir) / f"stats-rank{env.rank}.json").write_text(json.dumps(stats))
    # Both ranks leave together: a rank tearing gloo down while its peer still talks to it can
    # abort the peer ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
