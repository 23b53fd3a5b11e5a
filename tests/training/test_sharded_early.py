"""An early-emitted stream through the multi-rank learner: the one-process learner's delayed-
feedback handling (FNW, the copy's feature memory, the start bias, the cold-start hold), in
lockstep, at one rank and at two gloo ranks on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sharded_early_helpers as h


def _one_process(batch, sharded: bool, **kw):
    from training.distributed.learner import ShardedLearner

    learner = h.make_learner(batch, **kw)
    trainer = ShardedLearner(learner, 0, 1) if sharded else learner
    for rows in h.calls(batch):
        trainer.train(rows, now=h.NOW)
    return learner


@pytest.fixture(scope="module")
def split():
    return h.split_stream()


@pytest.fixture(scope="module")
def stream(split):
    return split[0]


@pytest.fixture(scope="module")
def reference(stream):
    return _one_process(stream, False)


def test_one_rank_trains_an_early_stream_as_the_one_process_learner(stream, reference):
    ref, got = reference, _one_process(stream, True)
    assert ref.cold_hold_stats is not None and ref.cold_hold_stats["merged"] > 0  # the hold ran
    assert ref.early_memory.hits > 100  # copies met their negatives' tower input
    (ref_logits, ref_labels), (logits, labels) = ref.evaluator.arrays(), got.evaluator.arrays()
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, want in ref.tower.state_dict().items():
        torch.testing.assert_close(got.tower.state_dict()[name], want, rtol=1e-4, atol=1e-5)
    assert got.examples_trained == ref.examples_trained
    assert got.cold_hold_stats == ref.cold_hold_stats
    assert (got.early_memory.hits, got.early_memory.misses) == (ref.early_memory.hits,
                                                                ref.early_memory.misses)


def test_flush_trains_what_the_hold_still_keeps(stream):
    from training.distributed.learner import ShardedLearner

    first = next(h.calls(stream))
    sl = ShardedLearner(h.make_learner(stream), 0, 1)
    assert sl.train(first, now=h.NOW) == 0  # early negatives held: no label final yet
    held = len(_held_ids(sl.learner))
    assert held > 0 and sl.flush(now=h.NOW) == held and sl.learner.cold_hold is None


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    from training.distributed.env import spawn_ranks

    out = tmp_path_factory.mktemp("sharded-early")
    codes = spawn_ranks(2, [sys.executable, str(Path(h.__file__).resolve()), str(out)], timeout_s=600)
    assert codes == [0, 0], codes
    return out


def _figures(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(calibration, AUC)."""
    from training.evaluation import auc_exact

    return h.calibration(logits, labels), auc_exact(logits, labels)


def test_two_ranks_keep_an_early_stream_calibrated_with_fnw_and_not_without(two_ranks, split, reference):
    """Scored on the stream's last tenth, on final labels, by the model trained before it."""
    from training.model.inference import score

    (cal_fnw, auc_fnw), (cal_none, _), (cal_window, auc_window) = (
        _figures(**np.load(two_ranks / f"{arm}-probes.npz")) for arm in ("fnw", "none", "window"))
    assert 0.9 < cal_fnw < 1.1, cal_fnw
    assert cal_none < 0.9, cal_none  # trained on the stream's label rate p/(1+p): biased low
    # ... next to the windowed join's, trained by the same ranks on the same impressions
    assert cal_fnw == pytest.approx(cal_window, abs=0.05) and auc_fnw > auc_window - 0.01
    assert abs(cal_none - cal_window) > 0.1
    # ... and as the one-process learner is, on the same stream
    probes = split[2]
    p = score(reference.table, reference.tower, probes.sparse, probes.dense, len(probes)).numpy()
    cal_ref, auc_ref = _figures(np.log(p) - np.log1p(-p), probes.label)
    assert cal_fnw == pytest.approx(cal_ref, abs=0.05) and auc_fnw == pytest.approx(auc_ref, abs=0.01)


def test_two_ranks_stay_in_lockstep_and_every_copy_meets_its_negative(two_ranks, reference):
    stats = [json.loads((two_ranks / f"fnw-rank{r}.json").read_text()) for r in range(2)]
    assert stats[0]["steps"] == stats[1]["steps"] and stats[0]["global_examples"] == stats[1]["global_examples"]
    assert stats[0]["global_examples"] == stats[0]["examples"] + stats[1]["examples"]
    assert stats[0]["warm_at_ms"] is not None and stats[0]["warm_at_ms"] == stats[1]["warm_at_ms"]
    ref = reference
    assert stats[0]["global_examples"] == ref.examples_trained  # each row trained once
    assert stats[0]["warm_at_ms"] == ref.cold_hold_stats["warm_at_ms"]  # warmth counted globally
    # Routed to their impression's rank, the copies find their negatives' tower input as often
    # as in one process (split at random without routing, about half would miss).
    assert sum(s["hits"] for s in stats) == ref.early_memory.hits > 1_000
    assert sum(s["misses"] for s in stats) == ref.early_memory.misses


def test_a_sharded_checkpoint_keeps_each_ranks_held_rows_and_a_reshard_keeps_them_all(two_ranks, stream):
    from training.distributed.checkpoint import ShardedCheckpointer

    held = [json.loads((two_ranks / f"held-rank{r}.json").read_text()) for r in range(2)]
    assert all(len(x["held"]) > 0 for x in held)
    cfg = h.make_learner(stream).cfg
    for r in range(2):  # the same world: each rank its own rows (restored without collectives)
        learner, _ = ShardedCheckpointer(two_ranks / "ckpt-warmup", r, 2).restore(cfg)
        assert sorted(_held_ids(learner)) == sorted(held[r]["held"])
        assert learner.cold_hold.final_trained == held[r]["final_trained"]
    one, _ = ShardedCheckpointer(two_ranks / "ckpt-warmup", 0, 1).restore(cfg)  # re-shard to 1
    assert sorted(_held_ids(one)) == sorted(held[0]["held"] + held[1]["held"])


def _held_ids(learner) -> list[int]:
    from streams.example_batch import decode_examples

    return decode_examples(learner.cold_hold.state()[0]).example_id.tolist()
