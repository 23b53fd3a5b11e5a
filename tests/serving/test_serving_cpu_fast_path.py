"""Trimming the batched forward's per-call CPU changes no score: the one-call forward, run without
the autocast context it used to enter, gives the scores it gave inside it (bf16 and fp32, plain,
dense and per-row batches), and the serving bench reports where a call's CPU goes."""

import argparse

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig, SlotDelta, TableDelta
from serving.calibration import Calibrator
from serving.compiled_forward import _local_batch
from serving.feature_assembly import assemble_batch
from serving.scoring import RankJob, ServingModel, score_jobs
from training.model import DenseTower, ModelConfig


def _model(dense_dim: int = 0, crosses: tuple[str, ...] = (), slot_pooling: tuple[str, ...] = ()) -> ServingModel:
    torch.manual_seed(4)
    slots = ("user_id", "item_id", "f00", "f01") + crosses
    cfg = ModelConfig(slots=slots, embedding_dim=8, dense_dim=dense_dim, hidden=(32, 16),
                      crosses=crosses, slot_pooling=slot_pooling)
    table = EmbeddingTable([SlotConfig(name=s, dim=8) for s in slots], seed=4)
    gen = torch.Generator().manual_seed(4)
    rows = {s: SlotDelta(ids=np.arange(300, dtype=np.int64), values=torch.randn(300, 8, generator=gen))
            for s in ("user_id", "item_id", "f00")}
    table.import_delta(TableDelta(from_version=0, to_version=1, slots=rows))
    return ServingModel("ctr", table, DenseTower(cfg).eval(), int(table.version), -1)


def _jobs(dense_dim: int) -> list[RankJob]:
    rng = np.random.default_rng(7)
    jobs = []
    for b, n in enumerate((200, 3, 57, 1)):
        context = {"f00": rng.integers(0, 320, size=b + 1)} if b % 2 else {}
        dense = rng.normal(size=dense_dim).astype(np.float32) if dense_dim and b != 2 else None
        jobs.append(RankJob(user_id=int(rng.integers(0, 400)), items=rng.integers(0, 330, size=n),
                            context=context, dense=dense))
    return jobs


def _inside_autocast(model: ServingModel, jobs: list[RankJob], bf16: bool) -> np.ndarray:
    """The one-call forward exactly as it ran before: inside ``torch.autocast``."""
    batch = assemble_batch(model, jobs, None, "user_id", "item_id")
    forward = _local_batch(model.tower, bf16, rows=batch.row_bags is not None)
    ids = [torch.from_numpy(np.ascontiguousarray(q, np.int64)) for _, q, _ in batch.queries]
    lengths = [None if n is None else torch.from_numpy(np.ascontiguousarray(n, np.int64)) for _, _, n in batch.queries]
    extra = () if batch.dense is None else (torch.from_numpy(batch.dense),)
    if batch.row_bags is not None:
        extra = (batch.row_bags, *extra)
    modes = [model.tower.cfg.pooling_of(slot) for slot, _, _ in batch.queries]
    with model.table.read_views([slot for slot, _, _ in batch.queries]) as views:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            probs = forward(*views, ids, lengths, torch.from_numpy(batch.job_rows), modes, 0.0, *extra)
    return probs.numpy()


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shape", ["plain", "dense", "crossed_mean"])
def test_the_one_call_forward_scores_as_it_did_inside_autocast(bf16, shape):
    dense_dim = 5 if shape == "dense" else 0
    crosses, pooling = (("user_id*f00",), ("f00=mean",)) if shape == "crossed_mean" else ((), ())
    model = _model(dense_dim, crosses, pooling)
    jobs = _jobs(dense_dim)
    got = np.concatenate(score_jobs(model, jobs, Calibrator(), bf16=bf16))
    want = _inside_autocast(model, jobs, bf16)
    assert got.shape == (261,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.array_equal(got, want)  # in fact the very same bits


def test_serving_bench_reports_the_floor_and_the_forward_in_situ():
    from bench import serving as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = bench.run(parser.parse_args(["--clients", "4", "--duration-s", "0.3", "--warmup-s", "0.3",
                                       "--items", "2000", "--p99-budget-ms", "1000", "--rounds", "1"]))
    point = out["points"][0]
    # the forward runs inside the server's CPU, and the bare gRPC stack answers for less than all of it
    assert 0 < point["forward_cpu_ms_per_call"] < point["server_cpu_ms_per_call"]
    assert 0 < point["grpc_floor_ms_per_call"]
    assert out["forward_cpu_ms_per_call"] == point["forward_cpu_ms_per_call"]
    assert out["grpc_floor_ms_per_call"] == point["grpc_floor_ms_per_call"]
    for field in ("server_cpu_ms_per_call", "ceiling_ms_per_call", "fraction_of_ceiling", "qps", "p99_ms",
                  "baseline_server_cpu_ms_per_call", "speedup_vs_baseline", "calls_per_forward"):
        assert field in out
