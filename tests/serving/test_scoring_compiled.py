"""The serving forward's compiled parts (TorchScript tower, one-call table read) change nothing
but speed: fp32 scores are the eager model's bit for bit, bf16 ones match eager autocast."""

import numpy as np
import torch

from serving.calibration import Calibrator
from serving.compiled_forward import compiled_tower as _compiled_tower
from serving.scoring import RankJob, score_jobs
from serving.testing import random_model
from training.model import DenseTower, ModelConfig


def _eager_probs(model, jobs, calibrator):
    """score_jobs' maths written out eagerly: per-slot lookups, the eager tower, calibration."""
    out = []
    for job in jobs:
        n = job.items.size
        cols = []
        for slot in model.tower.cfg.slots:
            if slot == "item_id":
                cols.append(model.table.lookup(slot, torch.from_numpy(job.items)))
                continue
            ids = job.context.get(slot, np.zeros(0, np.int64))
            if slot == "user_id":
                ids = np.concatenate([[job.user_id], ids]).astype(np.int64)
            bag = model.table.lookup_bags(slot, torch.from_numpy(ids), torch.tensor([ids.size]))
            cols.append(bag.expand(n, -1))
        with torch.no_grad():
            logits = model.tower(torch.stack(cols, dim=1))
        out.append(calibrator.probabilities(logits).numpy())
    return out


def test_fp32_scores_equal_the_eager_model_bit_for_bit():
    model = random_model(slots=("user_id", "item_id", "f00"), items=500, users=50, seed=2)
    jobs = [RankJob(user_id=3, items=np.arange(0, 40)), RankJob(user_id=10**15, items=np.array([7, 10**9, 499]),
                                                                context={"f00": np.array([1, 2, 3])})]
    got = score_jobs(model, jobs, Calibrator())
    for g, w in zip(got, _eager_probs(model, jobs, Calibrator())):
        assert np.array_equal(g, w)


def test_traced_towers_match_eager_with_dense_features_cross_layers_and_bf16():
    torch.manual_seed(0)
    cfg = ModelConfig(slots=("a", "b", "c"), embedding_dim=8, dense_dim=3, hidden=(32, 16), cross_layers=2)
    tower = DenseTower(cfg).eval()
    emb, dense = torch.randn(257, 3, 8), torch.randn(257, 3) * 100
    with torch.no_grad():
        want = tower(emb, dense)
        assert torch.equal(_compiled_tower(tower, False)(emb, dense), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_bf16 = tower(emb, dense).float()
            got_bf16 = _compiled_tower(tower, True)(emb, dense).float()
    torch.testing.assert_close(got_bf16, want_bf16, rtol=2e-2, atol=2e-2)
    assert _compiled_tower(tower, False) is _compiled_tower(tower, False)  # traced once per tower


def test_a_new_tower_is_traced_anew_so_new_dense_weights_are_served():
    model = random_model(slots=("user_id", "item_id"), items=50, users=5, hidden=(8,), seed=1)
    job = [RankJob(user_id=1, items=np.arange(10))]
    before = score_jobs(model, job, Calibrator())[0]
    tower = DenseTower(model.tower.cfg).eval()
    tower.load_state_dict(model.tower.state_dict())
    with torch.no_grad():
        tower.head.bias.add_(2.0)
    swapped = type(model)(model.model_id, model.table, tower, model.version + 1, model.watermark_ms)
    after = score_jobs(swapped, job, Calibrator())[0]
    assert (after > before).all()


class _NoViews:
    """The table without ``read_views``: what a remote table offers, so score_jobs takes the
    stepwise path (read, then broadcast, tower and calibration as separate calls)."""

    def __init__(self, table):
        self._table = table

    def lookup_many(self, queries, mode="sum"):
        return self._table.lookup_many(queries, mode=mode)


def test_one_call_forward_equals_the_stepwise_path_with_dense_features_and_a_calibration_shift():
    model = random_model(slots=("user_id", "item_id", "f00"), items=300, users=40, dense_dim=3, seed=4)
    stepwise = type(model)(model.model_id, _NoViews(model.table), model.tower, model.version, model.watermark_ms)
    rng = np.random.default_rng(1)
    jobs = [RankJob(user_id=int(u), items=rng.integers(0, 400, int(n)), dense=rng.normal(size=3).astype(np.float32),
                    context={"f00": np.arange(int(u) % 3)} if u % 2 else {})
            for u, n in zip(rng.integers(0, 60, 7), rng.integers(1, 30, 7))]
    cal = Calibrator(0.25)
    for bf16 in (False, True):
        one, steps = score_jobs(model, jobs, cal, bf16=bf16), score_jobs(stepwise, jobs, cal, bf16=bf16)
        assert [a.shape for a in one] == [b.shape for b in steps]
        for a, b in zip(one, steps):
            if bf16:  # same bf16 ops; allow for a different kernel order
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
            else:
                assert np.array_equal(a, b)
