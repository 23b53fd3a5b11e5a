"""The trainer's ``device`` option (TrainerConfig.device): validated at start, honoured by the
table, the tower and Adam, and the same step whichever kernels the table runs.

Without a GPU the CUDA placement itself cannot run here. What does: the validation, the CPU
placement, and a step whose table reads and updates go through the very Triton kernels a CUDA
table calls (``embedding_store.kernels.triton_on_cpu``, under the interpreter the suite's conftest
switches on), compared with the default path.
"""

import numpy as np
import pytest
import torch
from training_helpers import make_batch

from embedding_store import EmbeddingTable, SlotConfig, kernels
from training.config import TrainerConfig
from training.learner import Learner, make_table
from training.model import lookup_slots

CUDA = torch.cuda.is_available()


def _cfg(**kw):
    return TrainerConfig(**{**dict(batch_size=64, hidden=(16, 8), embedding_dim=8, dense_precision="fp32",
                                   eval_window=1_000), **kw})


def _batches(n=3, rows=64, dense_dim=3):
    return [make_batch(rows, start=i * rows, slots=("user_id", "item_id", "f00"), dense_dim=dense_dim)
            for i in range(n)]


@pytest.mark.parametrize("name", ["tpu", "gpu", "meta", "", "cuda:x"])
def test_a_device_that_is_not_cpu_or_cuda_is_refused_with_a_clear_error(name):
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        _cfg(device=name).validate()


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_cuda_is_refused_where_torch_sees_no_gpu():
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is false"):
        _cfg(device="cuda").validate()
    with pytest.raises(ValueError, match="is_available"):  # a config that skipped validate()
        Learner.for_batch(_cfg(device="cuda"), _batches(1)[0])


def test_the_default_device_is_the_cpu_and_everything_the_learner_trains_stays_there():
    assert TrainerConfig().device == "cpu"
    data = _batches()
    ln = Learner.for_batch(_cfg(), data[0])
    for b in data:
        ln.train(b)
    cpu = torch.device("cpu")
    assert ln.device == cpu and ln.table.device == cpu and ln.examples_trained == len(data) * 64
    assert {p.device for p in ln.tower.parameters()} == {cpu}
    state = [t for s in ln.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert state and {t.device for t in state} == {cpu}
    assert ln.evaluator.overall.learner.logloss() > 0  # the evaluator got host numpy scores


def test_make_table_puts_the_table_on_the_configured_device():
    assert make_table(_cfg(device="cpu"), ("a", "b")).device == torch.device("cpu")


def test_a_learner_refuses_a_table_on_another_device_than_its_config_names():
    table = EmbeddingTable([SlotConfig(name=s, dim=8) for s in ("f00", "item_id", "user_id")], device="meta")
    with pytest.raises(ValueError, match="the table is on meta, the config says cpu"):
        Learner.for_batch(_cfg(), _batches(1)[0], table=table)


def _logits(ln, batch):
    bags = lookup_slots(ln.table, ln.model_cfg.slots, batch.sparse, len(batch), ln.model_cfg.slot_poolings())
    with torch.no_grad():
        return ln.logits(bags.emb, torch.from_numpy(batch.dense).to(ln.device))


def _rows(table):
    out = {}
    for slot, sd in table.export_delta(0).slots.items():
        order = np.argsort(sd.ids)
        out[slot] = (sd.ids[order], sd.values[torch.from_numpy(order)])
    return out


@pytest.mark.skipif(CUDA, reason="the Triton interpreter is off where a GPU runs the compiled kernels")
@pytest.mark.parametrize("counters", [False, True])
def test_steps_through_the_table_s_triton_kernels_match_the_default_path(counters):
    # counters off: reads take the bag kernel and updates the fused Adagrad kernel; on: the
    # counter columns send updates to the reference optimizer, reads still take the bag kernel.
    cfg = _cfg(counters=counters)
    *train, held = _batches(4)
    default = Learner.for_batch(cfg, train[0])
    for b in train:
        default.train(b)
    triton = Learner.for_batch(cfg, train[0])
    with kernels.triton_on_cpu():
        assert kernels.use_triton(triton.table._store("user_id").values)  # noqa: SLF001
        for b in train:
            triton.train(b)
        got = _logits(triton, held)
    assert not kernels.use_triton(triton.table._store("user_id").values)  # noqa: SLF001 - off again
    torch.testing.assert_close(got, _logits(default, held), atol=1e-5, rtol=0)
    want_rows, got_rows = _rows(default.table), _rows(triton.table)
    assert want_rows.keys() == got_rows.keys()
    for slot, (ids, values) in want_rows.items():
        np.testing.assert_array_equal(got_rows[slot][0], ids)
        torch.testing.assert_close(got_rows[slot][1], values, atol=1e-5, rtol=0)
    for p, q in zip(triton.tower.parameters(), default.tower.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with kernels.triton_on_cpu():
            pass


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("extra", [[], ["--nproc", "2"]])
def test_headwater_train_refuses_a_device_it_cannot_use_before_it_starts(capsys, extra):
    from headwater.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--device", "cuda", "--json", *extra])
    assert exit_.value.code == 2
    assert "torch.cuda.is_available() is false" in capsys.readouterr().err
