"""Two gloo ranks on CPU reach the parameters of one process, given the same examples in order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dist_train_helpers as h


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    return h.two_rank_run(tmp_path_factory)


def _reference(case: str):
    learner = h.make_learner(case)
    for batch in h.global_batches():
        learner.train(batch, now=h.NOW)
    return learner


@pytest.mark.parametrize("case", sorted(h.CASES))
def test_two_ranks_match_one_process(two_rank_run, case):
    ref = _reference(case)
    shards = [load_file(str(two_rank_run / f"{case}-rank{r}.safetensors")) for r in range(2)]
    # Dense tower: DDP kept both ranks identical, and equal to the one-process tower.
    for name, want in ref.tower.state_dict().items():
        for shard in shards:
            torch.testing.assert_close(shard[f"tower.{name}"], want, rtol=1e-4, atol=1e-5)
    # Table: the shards partition the one-process table, row for row.
    from embedding_store.sharding import shard_of

    for slot, (ids, vals) in h.table_rows(ref.table).items():
        assert ids.size > 20  # the batches really created rows
        got_ids = np.concatenate([s[f"ids.{slot}"].numpy() for s in shards])
        got_vals = torch.cat([s[f"rows.{slot}"] for s in shards])
        for r, s in enumerate(shards):
            assert (shard_of(s[f"ids.{slot}"].numpy(), 2) == r).all()  # each rank keeps its own ids
        order = np.argsort(got_ids)
        np.testing.assert_array_equal(got_ids[order], ids)
        torch.testing.assert_close(got_vals[order], torch.from_numpy(vals), rtol=1e-4, atol=1e-5)
        assert float(np.abs(vals).max()) > 1e-3  # rows moved away from their zero init


def test_ranks_stay_in_lockstep(two_rank_run):
    stats = [json.loads((two_rank_run / f"stats-rank{r}.json").read_text()) for r in range(2)]
    for case in h.CASES:
        assert stats[0][case] == stats[1][case]
        assert stats[0][case]["steps"] == 6  # including the step where rank 1 had no rows
        assert stats[0][case]["global_examples"] == 6 * 64
        assert stats[0][case]["exchange_calls"] == 6 * 4  # counts, ids, vectors, grads per step
