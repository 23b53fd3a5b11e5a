"""The publish guard: what fails a check, the hold and the rollback rule, and — against the real
broker, trainer and serving replica — a poisoned burst that never reaches serving."""

import threading
import time
import uuid

import numpy as np
import pytest
import torch

from embedding_store import EmbeddingTable, SlotConfig, SlotDelta, TableDelta
from headwater.metrics import sample_value
from paramsync import DENSE, SNAPSHOT_END, SPARSE, decode_params
from serving.param_server import ParamServer, ParamServerConfig
from streams.events import encode_examples
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from training.config import TrainerConfig
from training.evaluation import BinnedAUC
from training.model import DenseTower, ModelConfig, tower_to_safetensors
from training.publish_guard import GuardConfig, PublishGuard, screen_examples
from training.sync import DeltaPublisher, SyncConfig
from training.synthetic import synthetic_examples
from training.trainer import OnlineTrainer
from training_helpers import make_batch


def _tower():
    torch.manual_seed(0)
    return DenseTower(ModelConfig(slots=("item_id",), embedding_dim=4, hidden=(8,)))


def _guard(**kw):
    acc, tower = BinnedAUC(), _tower()
    cfg = GuardConfig(**{"window": 1000, **kw})
    return PublishGuard(cfg, tower=lambda: tower, quality=lambda: acc), acc, tower


def _feed(acc, n, seed, flip=False):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    acc.update(logits, 1 - labels if flip else labels)


def _rows(values, slot="item_id"):
    values = torch.as_tensor(values, dtype=torch.float32)
    return TableDelta(0, 1, {slot: SlotDelta(ids=np.arange(len(values), dtype=np.int64), values=values)})


# -- what fails a check ------------------------------------------------------------------------


def test_a_row_holding_nan_is_held_back_and_calls_for_a_rollback_at_once():
    guard, _, _ = _guard(max_failures=5)
    v = guard.check(_rows([[0.1, 0.2], [float("nan"), 0.0]]), {}, "sparse")
    assert not v.ok and v.reason == "nonfinite_rows" and "ids [1]" in v.message
    assert guard.holding and guard.rollback_due  # NaN state never heals by training


def test_a_tower_holding_an_infinity_is_held_back():
    guard, _, tower = _guard()
    with torch.no_grad():
        tower.head.bias.fill_(float("inf"))
    v = guard.check(None, {}, "dense")
    assert not v.ok and v.reason == "nonfinite_tower" and "head.bias" in v.message


def test_row_norms_leave_the_counter_columns_out():
    guard, _, _ = _guard(max_row_norm=10.0)
    slots = {"item_id": SlotConfig(name="item_id", dim=4, counter_columns=2)}
    assert guard.check(_rows([[1.0, 1.0, 500.0, 900.0]]), slots, "sparse").ok  # counts may be large
    v = guard.check(_rows([[30.0, 1.0, 5.0, 9.0]]), slots, "sparse")
    assert not v.ok and v.reason == "row_norm" and "id 0" in v.message


def test_an_oversized_tower_tensor_is_held_back():
    guard, _, tower = _guard(max_tower_norm=50.0)
    assert guard.check(None, {}, "dense").ok
    with torch.no_grad():
        tower.head.weight.mul_(1e4)
    v = guard.check(None, {}, "dense")
    assert not v.ok and v.reason == "tower_norm" and "head.weight" in v.message


def test_a_window_with_flipped_labels_fails_against_the_last_good_window():
    guard, acc, _ = _guard(logloss_rise=0.0)
    for seed in range(3):  # good windows: the first marks, the next ones judge and set the reference
        _feed(acc, 1000, seed)
        assert guard.check(None, {}, "sparse").ok
    assert guard.baseline is not None and guard.baseline.auc > 0.75
    _feed(acc, 1000, 9, flip=True)
    v = guard.check(None, {}, "sparse")
    assert not v.ok and v.reason == "auc" and v.judged and "last good window AUC" in v.message


def test_a_rising_logloss_fails_on_its_own():
    guard, acc, _ = _guard(auc_drop=0.0)
    for seed in range(3):
        _feed(acc, 1000, seed)
        guard.check(None, {}, "sparse")
    acc.update(np.full(1000, 6.0), np.zeros(1000))  # confident and wrong: AUC undefined, loss huge
    v = guard.check(None, {}, "sparse")
    assert not v.ok and v.reason == "logloss"


def _feed_calibrated(acc, n, seed, mean_logit):
    """A calibrated model's window: labels drawn from its own probabilities."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(mean_logit, 1.0, n)
    acc.update(logits, (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float64))


def test_a_click_rate_swing_is_not_a_log_loss_rise():
    """The same calibrated model at 6% and then 22% clicks (a day's swing): its log loss rises
    by 0.25, its normalized entropy does not. The check carries the reference to the window's
    click rate, so the update goes out; a confidently wrong window at that rate still fails."""
    guard, acc, _ = _guard(auc_drop=0.0, window=5000)
    for seed in range(3):
        _feed_calibrated(acc, 5000, seed, -3.2)
        assert guard.check(None, {}, "sparse").ok
    ref = guard.baseline
    assert ref is not None and 0.04 < ref.positive_rate < 0.08
    for seed in range(3, 5):
        _feed_calibrated(acc, 5000, seed, -1.6)
        v = guard.check(None, {}, "sparse")
        assert v.ok, v.message
    assert guard.baseline.positive_rate > 0.18 and guard.baseline.logloss - ref.logloss > 0.2
    rng = np.random.default_rng(9)
    logits = rng.normal(-1.6, 1.0, 5000)
    acc.update(logits, (rng.random(5000) < 1 / (1 + np.exp(logits))).astype(np.float64))  # anti
    v = guard.check(None, {}, "sparse")
    assert not v.ok and v.reason == "logloss" and "at this click rate" in v.message


def test_a_window_without_clicks_passes_but_never_becomes_the_reference():
    # An early-emitting joiner's first examples are all negatives (no click has arrived yet): the
    # model is confidently right on them and their log loss is ~0. As the reference, it would hold
    # every later, normal window back.
    guard, acc, _ = _guard()
    for seed in range(2):
        acc.update(np.full(1000, -8.0), np.zeros(1000))
        assert guard.check(None, {}, "sparse").ok
    assert guard.baseline is None
    for seed in range(3):
        _feed(acc, 1000, seed)
        assert guard.check(None, {}, "sparse").ok, "a normal window after the click-less start"
    assert guard.baseline is not None and guard.baseline.auc > 0.75


def test_a_window_too_small_to_judge_neither_fails_nor_releases_a_hold():
    guard, acc, _ = _guard()
    _feed(acc, 400, 0, flip=True)
    first = guard.check(None, {}, "sparse")
    assert first.ok and not first.judged  # too few examples: the quality check is off
    for seed in (1, 2, 3):
        _feed(acc, 1000, seed)
        guard.check(None, {}, "sparse")
    _feed(acc, 1000, 4, flip=True)
    assert guard.check(None, {}, "sparse").reason == "auc"
    _feed(acc, 500, 5)  # fresh, but fewer than the window since the failure
    waiting = guard.check(None, {}, "sparse")
    assert not waiting.ok and waiting.reason == "waiting" and guard.holding
    assert guard.consecutive_failures == 1  # waiting is no failure
    _feed(acc, 600, 6)
    assert guard.check(None, {}, "sparse").ok and not guard.holding


def test_consecutive_failures_call_for_a_rollback_and_a_failed_rollback_keeps_holding():
    guard, acc, _ = _guard(max_failures=2)
    for seed in range(3):
        _feed(acc, 1000, seed)
        guard.check(None, {}, "sparse")
    _feed(acc, 1000, 10, flip=True)
    guard.check(None, {}, "sparse")
    assert guard.holding and not guard.rollback_due
    _feed(acc, 1000, 11, flip=True)
    guard.check(None, {}, "sparse")
    assert guard.rollback_due and guard.failures == {"auc": 2}
    guard.rolled_back(False, "no checkpoint")
    assert guard.holding and not guard.rollback_due  # alerted once; waits for a passing check
    guard.rolled_back(True)
    assert not guard.holding and guard.rollbacks == 1


# -- the publisher obeys it ------------------------------------------------------------------------


class _Sent:
    def __init__(self, offset):
        self.offset = offset

    def get(self, timeout=None):
        return self


class _Producer:
    """Records what a DeltaPublisher sends (no broker needed)."""

    def __init__(self):
        self.sent = []

    def send(self, topic, value, key=None, partition=0):
        self.sent.append(decode_params(value))
        return _Sent(len(self.sent) - 1)

    def flush(self, timeout=None):
        pass

    def partitions_for(self, topic):
        return {0}


def test_the_publisher_sends_nothing_while_the_guard_holds_and_everything_once_it_passes():
    table = EmbeddingTable([SlotConfig(name="item_id", dim=4)])
    table.lookup("item_id", torch.arange(10), train=True)
    tower = _tower()
    guard = PublishGuard(GuardConfig(auc_drop=0, logloss_rise=0), tower=lambda: tower)
    producer = _Producer()
    pub = DeltaPublisher(producer, "hw.params", table, lambda: tower_to_safetensors(tower),
                         SyncConfig(sparse_interval_s=1.0, dense_interval_s=60.0), guard=guard)
    assert pub.maybe_publish(1_000, now=0.0) and producer.sent[-1].kind == SNAPSHOT_END
    published = pub.published_version
    table.import_delta(_rows([[float("nan")] * 4, [0.5] * 4]))  # a broken update of rows 0 and 1
    producer.sent.clear()
    assert not pub.maybe_publish(2_000, now=2.0) and pub.holding
    assert not pub.publish_sparse(2_000) and not pub.publish_dense(2_000) and not pub.state_is_good()
    assert producer.sent == [] and pub.published_version == published
    assert not pub.maybe_publish(2_000, now=2.5)  # held: re-checked at the sparse cadence only
    table.import_delta(_rows([[0.25] * 4]))  # training repaired row 0
    assert pub.maybe_publish(3_000, now=3.1) and not pub.holding
    kinds = [m.kind for m in producer.sent]
    assert SPARSE in kinds and DENSE in kinds  # the rows held back, and the tower with them
    sparse = [m.table_delta() for m in producer.sent if m.kind == SPARSE]
    assert {1} <= set(np.concatenate([d.slots["item_id"].ids for d in sparse]).tolist())
    assert pub.published_version == table.version


def test_bad_examples_are_refused_before_training():
    batch = make_batch(6, dense_dim=2)
    batch.dense[1, 0] = np.nan
    batch.label[2] = 3.0
    batch.sample_rate[3] = 0.0
    clean, refused = screen_examples(batch, "test")
    assert len(clean) == 3 and len(refused) == 3
    assert sorted(refused.example_id.tolist()) == [1, 2, 3]
    assert screen_examples(clean)[1] is None


def test_trainer_config_rejects_negative_guard_settings():
    with pytest.raises(ValueError, match="guard"):
        TrainerConfig(guard_auc_drop=-0.1).validate()
    with pytest.raises(ValueError, match="guard_window"):
        TrainerConfig(guard_window=0).validate()


# -- end to end: trainer -> hw.params -> serving replica ---------------------------------------------


def _with_dense(batches, seed, nan=False):
    rng = np.random.default_rng(seed)
    for b in batches:
        b.dense = rng.normal(size=(len(b), 2)).astype(np.float32)
        if nan:
            b.dense[:, 1] = np.nan
    return batches


def _produce(kafka, batches, gap_s=0.0):
    producer = BatchProducer(kafka)
    topic = topic_names(kafka.topic_prefix).examples
    for b in batches:
        producer.send(topic, encode_examples(b))
        if gap_s:
            producer.flush()
            time.sleep(gap_s)
    producer.flush()
    producer.close()


def _cfg(**kw):
    base = dict(group_id=f"g-{uuid.uuid4().hex[:8]}", batch_size=400, hidden=(16, 8), max_batch_wait_ms=50,
                sparse_sync_interval_s=0.2, dense_sync_interval_s=0.5, checkpoint_interval_s=1e9,
                guard_window=2000, guard_auc_drop=0.1, guard_logloss_rise=0.15)
    base.update(kw)
    return TrainerConfig(**base)


def _train_clean(trainer, kafka, ps, n, seed):
    """Feeds ``n`` clean examples message by message, trains them all, waits until serving has them."""
    while not trainer.consumer.assignment():
        trainer.step()
    batches = _with_dense(synthetic_examples(n, 400, slots=3, vocab=300, seed=seed), seed)
    feeder = threading.Thread(target=_produce, args=(kafka, batches, 0.1))
    feeder.start()
    deadline = time.monotonic() + 120
    while (feeder.is_alive() or trainer.learner is None or trainer.learner.examples_trained < n) \
            and time.monotonic() < deadline:
        trainer.step()
    feeder.join()
    # Publish the tower of the trained state too (else it leaves at the next dense interval, as a
    # new version), then wait until serving holds that version: a version names rows and tower.
    trainer.request_dense()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            ps.ready and not trainer.publisher.dense_requested
            and trainer.publisher.published_version == int(trainer.learner.table.version) == ps.state.version):
        trainer.step(poll_timeout_ms=20)
    assert ps.state.version == trainer.publisher.published_version
    assert all(torch.equal(t, trainer.learner.tower.state_dict()[k])
               for k, t in ps.current().tower.state_dict().items())


def _finite(model):
    tower_ok = all(torch.isfinite(t).all() for t in model.tower.state_dict().values() if t.is_floating_point())
    rows = [model.table.lookup(s, torch.from_numpy(model.table.ids(s))) for s in model.table.slots]
    return tower_ok and all(torch.isfinite(r).all() for r in rows)


def test_a_poisoned_burst_never_reaches_serving(kafka_topics):
    trainer = OnlineTrainer(_cfg(guard_max_failures=0), kafka_topics)  # hold; never roll back
    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers,
                     topic_names(kafka_topics.topic_prefix).params)
    ps.start()
    try:
        _train_clean(trainer, kafka_topics, ps, 8000, seed=21)
        assert trainer.guard.failures == {} and trainer.guard.baseline is not None
        served_version = ps.state.version
        served_tower = {k: v.clone() for k, v in ps.current().tower.state_dict().items()}
        refused_before = sample_value("hw_train_rejected_examples_total", {"reason": "nonfinite_dense"}) or 0.0

        # The burst: every label flipped, then a message whose dense values are NaN.
        flipped = _with_dense(synthetic_examples(2400, 2400, slots=3, vocab=300, seed=22, first_example=10**6), 22)
        for b in flipped:
            b.label = 1.0 - b.label
        broken = _with_dense(synthetic_examples(400, 400, slots=3, vocab=300, seed=23, first_example=2 * 10**6),
                             23, nan=True)
        _produce(kafka_topics, flipped + broken)
        deadline = time.monotonic() + 60
        seen_versions = set()
        while time.monotonic() < deadline and (trainer.learner.examples_trained < 10_400 or not trainer.guard.failures):
            trainer.step()
            seen_versions.add(ps.state.version)
        end = time.monotonic() + 2.0  # and a while longer: the hold lasts
        while time.monotonic() < end:
            trainer.step(poll_timeout_ms=20)
            seen_versions.add(ps.state.version)

        assert trainer.learner.examples_trained == 10_400  # the NaN rows were refused, not trained
        refused = sample_value("hw_train_rejected_examples_total", {"reason": "nonfinite_dense"}) - refused_before
        assert refused == 400
        assert set(trainer.guard.failures) <= {"auc", "logloss"} and trainer.guard.failures
        assert trainer.guard.holding and trainer.summary()["guard"]["holding"]
        assert seen_versions == {served_version}  # serving never moved off the last good version
        assert trainer.publisher.published_version == served_version
        model = ps.current()
        assert all(torch.equal(t, served_tower[k]) for k, t in model.tower.state_dict().items())
        assert _finite(model)
    finally:
        ps.stop()
        trainer.close()


def test_a_nan_in_the_trainers_state_rolls_it_back_to_the_last_checkpoint_and_serving_follows(kafka_topics, tmp_path):
    trainer = OnlineTrainer(_cfg(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_interval_s=0.3), kafka_topics)
    ps = ParamServer(ParamServerConfig(poll_timeout_ms=50), kafka_topics.bootstrap_servers,
                     topic_names(kafka_topics.topic_prefix).params)
    ps.start()
    try:
        _train_clean(trainer, kafka_topics, ps, 4000, seed=31)
        done = trainer.checkpoints
        while trainer.checkpoints == done:  # a checkpoint of exactly the state serving has
            trainer.step(poll_timeout_ms=20)
        good = {k: v.clone() for k, v in trainer.learner.tower.state_dict().items()}
        before, snapshot = trainer.publisher.published_version, ps.state.snapshot_id

        with torch.no_grad():  # a numerical blow-up inside the trainer
            trainer.learner.tower.head.bias.fill_(float("nan"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (trainer.guard.rollbacks and ps.state.snapshot_id != snapshot
                                                   and ps.state.version == trainer.publisher.published_version):
            trainer.step(poll_timeout_ms=20)
            assert _finite(ps.current())

        assert trainer.guard.rollbacks == 1 and trainer.guard.failures == {"nonfinite_tower": 1}
        assert not trainer.guard.holding
        assert trainer.publisher.published_version > before  # versions only grow on the wire
        assert ps.state.version == trainer.publisher.published_version  # the snapshot, loaded
        assert all(torch.equal(t, good[k]) for k, t in ps.current().tower.state_dict().items())
        assert all(torch.equal(t, good[k]) for k, t in trainer.learner.tower.state_dict().items())
    finally:
        ps.stop()
        trainer.close()
