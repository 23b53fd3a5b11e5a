"""One prequential step at a time, on the real embedding table (no Kafka)."""

import numpy as np
import pytest
import torch

from training.config import TrainerConfig
from training.learner import Learner
from training.model import lookup_slots
from training.synthetic import synthetic_examples


def _cfg(**kw):
    base = dict(batch_size=512, hidden=(32, 16), eval_window=10_000, dense_lr=3e-3)
    base.update(kw)
    return TrainerConfig(**base)


def test_the_learner_approaches_the_ground_truth_auc_on_a_synthetic_stream():
    data = synthetic_examples(60_000, 500, slots=4, vocab=300, seed=2)
    ln = Learner.for_batch(_cfg(), data[0])
    for b in data:
        ln.train(b)
    first, last = ln.evaluator.windows[0], ln.evaluator.windows[-1]
    assert last.auc > first.auc + 0.02
    assert last.truth_auc - last.auc < 0.04
    assert ln.examples_trained == 60_000


def test_examples_are_scored_before_they_are_trained_on():
    (batch,) = synthetic_examples(256, 256, slots=3, vocab=50, seed=3)
    ln = Learner.for_batch(_cfg(), batch)
    ln.train(batch)
    # A model that scored the batch *after* training on it would beat its recorded loss.
    with torch.no_grad():
        from training.model import weighted_bce
        bags = lookup_slots(ln.table, ln.model_cfg.slots, batch.sparse, len(batch))
        after = weighted_bce(ln.tower(bags.emb), torch.from_numpy(batch.label)).item()
    assert ln.evaluator.overall.learner.logloss() > after


def test_repeated_examples_are_skipped_and_counted():
    (batch,) = synthetic_examples(300, 300, slots=3, vocab=50, seed=4)
    ln = Learner.for_batch(_cfg(), batch)
    assert ln.train(batch) == 300
    version = ln.table.version
    assert ln.train(batch) == 0
    assert ln.times.duplicates == 300 and ln.table.version == version


def test_a_step_changes_only_the_rows_of_the_ids_in_the_batch():
    a, b = synthetic_examples(400, 200, slots=3, vocab=10_000, seed=5)
    ln = Learner.for_batch(_cfg(), a)
    ln.train(a)
    v = ln.table.version
    ln.train(b)
    delta = ln.table.export_delta(since_version=v)
    for slot, sd in delta.slots.items():
        assert set(sd.ids.tolist()) <= set(b.sparse[slot].values.tolist())


def test_state_round_trip_restores_tower_optimizer_dedup_and_metrics():
    data = synthetic_examples(2000, 500, slots=3, vocab=100, seed=6)
    ln = Learner.for_batch(_cfg(), data[0])
    for b in data[:3]:
        ln.train(b)
    tensors, meta = ln.state()
    back = Learner.restore(ln.cfg, ln.table, tensors, meta)
    assert back.examples_trained == 1500 and back.watermark_ms == ln.watermark_ms
    assert back.train(data[0]) == 0  # already seen
    for p, q in zip(ln.tower.parameters(), back.tower.parameters()):
        assert torch.equal(p, q)
    assert back.evaluator.summary()["overall"] == ln.evaluator.summary()["overall"]
    np.testing.assert_array_equal(back.dedup.seen(data[3].example_id), np.zeros(500, bool))


def test_a_bf16_tower_learns_like_fp32_and_keeps_its_state_in_fp32():
    data = synthetic_examples(30_000, 500, slots=4, vocab=300, seed=7)
    runs = {}
    for prec in ("fp32", "bf16"):
        ln = Learner.for_batch(_cfg(dense_precision=prec, eval_window=5_000), data[0])
        assert ln.bf16 == (prec == "bf16")
        for b in data:
            ln.train(b)
        runs[prec] = ln
    b16 = runs["bf16"]
    assert all(p.dtype == torch.float32 for p in b16.tower.parameters())
    assert all(v.dtype == torch.float32 for st in b16.optimizer.state.values() for v in st.values()
               if torch.is_tensor(v) and v.numel() > 1)
    # Same data, same seeds: the bf16 run ends within a hair of the fp32 run's AUC.
    assert abs(b16.evaluator.windows[-1].auc - runs["fp32"].evaluator.windows[-1].auc) < 0.01
    # And its forward really runs in bf16: logits differ from an fp32 forward of the same weights.
    bags = lookup_slots(b16.table, b16.model_cfg.slots, data[0].sparse, len(data[0]))
    with torch.no_grad():
        fast, exact = b16.logits(bags.emb, None), b16.tower(bags.emb)
    assert fast.dtype == torch.float32
    assert 0 < (fast - exact).abs().max().item() < 0.1


def test_an_unknown_dense_precision_is_refused():
    with pytest.raises(ValueError, match="dense_precision"):
        _cfg(dense_precision="fp16").validate()


def test_a_poisoned_tower_skips_the_batch_instead_of_crashing_or_poisoning_rows():
    import torch

    from training.learner import Learner
    from streams.generator import GeneratorConfig, SyntheticStream

    stream = SyntheticStream(GeneratorConfig(seed=0))
    batch = stream.examples(stream.block(64))
    learner = Learner.for_batch(_cfg(), batch)
    assert learner.train(batch) == len(batch)
    before = {s: learner.table.lookup(s, torch.from_numpy(learner.table.ids(s))).clone()
              for s in learner.model_cfg.slots}
    with torch.no_grad():
        learner.tower.head.weight.fill_(float("nan"))
    nxt = stream.examples(stream.block(64))
    assert learner.train(nxt) == 0 and learner.nonfinite_batches == 1
    for s, rows in before.items():
        after = learner.table.lookup(s, torch.from_numpy(learner.table.ids(s))[: len(rows)])
        assert torch.isfinite(after).all()
