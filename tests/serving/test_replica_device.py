"""The serving replica's device option (``ParamServerConfig.replica_device``,
``ModelReplica(device=...)``): validated at start, honoured by the table and every tower the
replica loads, and scores back on the host.

Without a GPU the CUDA placement cannot run here; the GPU branch of the tower forward runs on CPU
tensors (its maths, not its device moves), and ``scripts/gpu-check.sh`` drives the whole path on
a GPU (bench/gpu_check/embedding_product.py).
"""

import numpy as np
import pytest
import torch

from bench.gpu_check.embedding_product import RecordingProducer
from serving.calibration import Calibrator
from serving.compiled_forward import _device_logits, tower_logits
from serving.param_server import ParamServer, ParamServerConfig
from serving.replica import ModelReplica
from serving.scoring import ExampleRows, ServingModel, score_examples
from serving.testing import random_model
from training.config import TrainerConfig
from training.learner import Learner
from training.model import tower_to_safetensors
from training.sync import DeltaPublisher, SyncConfig
from training.synthetic import synthetic_examples

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("name", ["tpu", "gpu", "meta", ""])
def test_a_replica_device_that_is_not_cpu_or_cuda_is_refused(name):
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        ParamServerConfig(replica_device=name).validate()
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        ModelReplica("ctr", device=name)


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_a_cuda_replica_is_refused_where_torch_sees_no_gpu():
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is false"):
        ParamServerConfig(replica_device="cuda").validate()
    with pytest.raises(ValueError, match="is_available"):
        ParamServer(ParamServerConfig(replica_device="cuda"), "127.0.0.1:1", "hw.params")


def test_a_recommender_over_ps_shards_refuses_a_replica_device():
    # Its rows come over RPC, on the host: a tower on a GPU would meet them there.
    cfg = ParamServerConfig(num_shards=2, replica_device="cuda")
    with pytest.raises(ValueError, match="holds no table"):
        ParamServer(cfg, "127.0.0.1:1", "hw.params", partition=2)


def _published(n_batches=3):
    """The hw.params messages of a trained learner: a snapshot, then live sparse and dense updates."""
    cfg = TrainerConfig(batch_size=64, hidden=(16, 8), embedding_dim=8, dense_precision="fp32")
    data = synthetic_examples(64 * n_batches, 64, slots=3, vocab=100, seed=4)
    ln = Learner.for_batch(cfg, data[0])
    producer = RecordingProducer()
    pub = DeltaPublisher(producer, "hw.params", ln.table, lambda: tower_to_safetensors(ln.tower),
                         SyncConfig(model_id="ctr"))
    ln.train(data[0])
    pub.publish_snapshot(watermark_ms=1_000)
    for b in data[1:]:
        ln.train(b)
    pub.publish_sparse(watermark_ms=2_000)
    pub.publish_dense(watermark_ms=2_000)
    return ln, producer.sent


def test_a_cpu_replica_builds_its_table_and_every_tower_it_loads_on_the_cpu():
    ln, messages = _published()
    replica = ModelReplica("ctr", device="cpu")
    for msg in messages:
        replica.apply(msg)
    cpu = torch.device("cpu")
    assert replica.ready and replica.device == cpu and replica.table.device == cpu
    assert {p.device for p in replica.tower.parameters()} == {cpu}
    for slot in ln.model_cfg.slots:  # the live update arrived too, bit for bit
        ids = torch.from_numpy(np.sort(ln.table.ids(slot)))
        assert torch.equal(replica.table.lookup(slot, ids), ln.table.lookup(slot, ids))
    for p, q in zip(replica.tower.parameters(), ln.tower.parameters()):
        assert torch.equal(p, q)
    model = ServingModel("ctr", replica.table, replica.tower, replica.version, replica.watermark_ms)
    rows = ExampleRows(4, {"user_id": (np.arange(4, dtype=np.int64), np.ones(4, np.int64))}, None)
    probs = score_examples(model, rows, Calibrator())
    assert isinstance(probs, np.ndarray) and probs.shape == (4,) and np.all((probs > 0) & (probs < 1))


@pytest.mark.parametrize("dense_dim", [0, 5])
def test_the_gpu_branch_of_the_tower_forward_computes_what_the_traced_cpu_forward_does(dense_dim):
    model = random_model(dense_dim=dense_dim, hidden=(32, 16))
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(40, len(model.slots), 16, generator=gen)
    dense = torch.randn(40, dense_dim, generator=gen) if dense_dim else None
    got = _device_logits(model.tower, emb, dense, bf16=False)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, tower_logits(model, emb, dense), atol=1e-6, rtol=0)
