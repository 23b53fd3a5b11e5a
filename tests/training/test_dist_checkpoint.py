"""Sharded checkpoints: one manifest over per-rank shards; restoring onto another number of ranks re-shards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import dist_train_helpers as h
from embedding_store.sharding import shard_of
from training.distributed.checkpoint import SHARDED_MANIFEST, ShardedCheckpointer

CASE = "sum_adagrad"


def _trained_reference():
    learner = h.make_learner(CASE)
    for batch in h.global_batches():
        learner.train(batch, now=h.NOW)
    return learner


def _state_rows(table, slot, ids):
    """Values and optimizer state of ``ids`` (in that order)."""
    d = table.export_delta(since_version=0, with_state=True).slots[slot]
    pos = {int(i): k for k, i in enumerate(d.ids)}
    idx = torch.tensor([pos[int(i)] for i in ids], dtype=torch.int64)
    return d.values.index_select(0, idx), {k: v.index_select(0, idx) for k, v in d.state.items()}


def test_one_process_checkpoint_restores_onto_two_ranks_each_keeping_its_own_ids(tmp_path):
    ref = _trained_reference()
    m = ShardedCheckpointer(tmp_path, 0, 1).write(ref, {("hw.examples", 0): 42})
    assert m.world_size == 1 and m.offsets == {"hw.examples:0": 42}
    restored = [ShardedCheckpointer(tmp_path, r, 2).restore(ref.cfg) for r in range(2)]
    for slot, (ids, vals) in h.table_rows(ref.table).items():
        seen = []
        for r, (learner, manifest) in enumerate(restored):
            assert manifest.offsets_by_partition() == {("hw.examples", 0): 42}
            mine = learner.table.ids(slot)
            assert mine.size and (shard_of(mine, 2) == r).all()
            want_v, want_s = _state_rows(ref.table, slot, np.sort(mine))
            got_v, got_s = _state_rows(learner.table, slot, np.sort(mine))
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
            for k in want_s:  # the Adagrad accumulators moved with their rows
                torch.testing.assert_close(got_s[k], want_s[k], rtol=0, atol=0)
            seen.append(mine)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), ids)
    for learner, _ in restored:
        for name, want in ref.tower.state_dict().items():
            torch.testing.assert_close(learner.tower.state_dict()[name], want, rtol=0, atol=0)
        assert learner.examples_trained == ref.examples_trained


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    return h.two_rank_run(tmp_path_factory) / f"ckpt-{CASE}"


def test_two_rank_checkpoint_has_one_manifest_over_both_shards(two_rank_checkpoint):
    m = json.loads((two_rank_checkpoint / SHARDED_MANIFEST).read_text())
    assert m["world_size"] == 2 and m["seq"] == 1
    assert [e["dir"] for e in m["shards"]] == ["shard-000-of-002", "shard-001-of-002"]
    assert m["offsets"] == {"hw.examples:0": 10, "hw.examples:1": 11}
    for e in m["shards"]:
        assert (two_rank_checkpoint / e["dir"] / e["state_file"]).exists()


def test_two_rank_checkpoint_restores_onto_one_rank_as_the_one_process_model(two_rank_checkpoint,
                                                                            tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_rank_checkpoint, ckpt)  # this test writes to it; others read the original
    ref = _trained_reference()
    learner, m = ShardedCheckpointer(ckpt, 0, 1).restore(ref.cfg)
    assert m.world_size == 2
    for slot, (ids, vals) in h.table_rows(ref.table).items():
        got_ids, got_vals = h.table_rows(learner.table)[slot]
        np.testing.assert_array_equal(got_ids, ids)
        torch.testing.assert_close(torch.from_numpy(got_vals), torch.from_numpy(vals),
                                   rtol=1e-4, atol=1e-5)
    for name, want in ref.tower.state_dict().items():
        torch.testing.assert_close(learner.tower.state_dict()[name], want, rtol=1e-4, atol=1e-5)
    # Writing on the new layout drops the old shard directories once the new manifest is durable.
    ShardedCheckpointer(ckpt, 0, 1).write(learner, m.offsets_by_partition())
    assert sorted(p.name for p in ckpt.glob("shard-*")) == ["shard-000-of-001"]


def test_a_corrupt_manifest_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / SHARDED_MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        ShardedCheckpointer(tmp_path, 0, 2).restore(h.make_learner(CASE).cfg)


class _Killed(BaseException):
    """Stands for the SIGKILL: nothing after it in the write runs."""


def test_a_rank_killed_between_its_shard_and_the_sharded_manifest_resumes_from_the_named_tables(
        tmp_path, monkeypatch):
    import training.distributed.checkpoint as dc

    batches = h.global_batches()
    learner = h.make_learner(CASE)
    learner.train(batches[0], now=h.NOW)
    first = ShardedCheckpointer(tmp_path, 0, 1).write(learner, {("hw.examples", 0): 1})
    assert first.shards[0]["table_dir"] and first.shards[0]["state_sha256"]
    named = h.table_rows(learner.table)

    write = dc.atomic_write_bytes

    def die_at_the_sharded_manifest(path, data):
        if path.name == SHARDED_MANIFEST:
            raise _Killed
        write(path, data)

    monkeypatch.setattr(dc, "atomic_write_bytes", die_at_the_sharded_manifest)
    for kill in range(2):  # twice: the named checkpoint must survive the next shard write too
        ckpt = ShardedCheckpointer(tmp_path, 0, 1)
        resumed, m = ckpt.restore(learner.cfg)
        assert m.seq == first.seq and m.offsets == {"hw.examples:0": 1}
        for slot, (ids, vals) in named.items():  # the named table, not the shard's newer one
            got_ids, got_vals = h.table_rows(resumed.table)[slot]
            np.testing.assert_array_equal(got_ids, ids)
            np.testing.assert_array_equal(got_vals, vals)
        resumed.train(batches[1 + kill], now=h.NOW)
        with pytest.raises(_Killed):
            ckpt.write(resumed, {("hw.examples", 0): 2 + kill})
        # The shard's own manifest is ahead of the sharded one: its table holds the new updates.
        assert ckpt.store.latest().seq > first.shards[0]["seq"]
