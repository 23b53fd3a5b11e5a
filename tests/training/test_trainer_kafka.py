"""The online trainer against the real broker: consume, de-dup, DLQ, sync, replica bootstrap."""

import threading
import time
import uuid

import numpy as np
import torch

from paramsync import SNAPSHOT_BEGIN, ParamsFollower, bootstrap_offset, decode_params
from serving.replica import ModelReplica
from streams.events import encode_examples
from streams.kafka_consumer import read_topic
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from training.config import TrainerConfig
from training.synthetic import synthetic_examples
from training.trainer import OnlineTrainer


def _produce(kafka, messages, gap_s=0.0):
    producer = BatchProducer(kafka)
    topic = topic_names(kafka.topic_prefix).examples
    for m in messages:
        producer.send(topic, m)
        if gap_s:
            producer.flush()
            time.sleep(gap_s)
    producer.flush()
    producer.close()


def _run_fed(trainer, kafka, batches, gap_s=0.15):
    """Joins the group first, then feeds messages while the trainer runs (so training spans time).

    The trainer steps by hand while the feeder runs; only then may its idle timer end the run, so
    a feeder starved on a loaded machine cannot look like the end of the stream.
    """
    while not trainer.consumer.assignment():
        trainer.step()
    feeder = threading.Thread(target=_produce, args=(kafka, [encode_examples(b) for b in batches], gap_s))
    feeder.start()
    while feeder.is_alive():
        trainer.step()
    feeder.join()
    return trainer.run()


def _cfg(**kw):
    base = dict(group_id=f"trainer-{uuid.uuid4().hex[:8]}", batch_size=400, hidden=(16, 8), idle_exit_s=2.0, max_batch_wait_ms=50,
                sparse_sync_interval_s=0.2, checkpoint_interval_s=1e9)
    base.update(kw)
    return TrainerConfig(**base)


def test_trainer_learns_every_example_once_and_routes_bad_input_to_the_dlq(kafka_topics):
    batches = synthetic_examples(3000, 500, slots=3, vocab=100, seed=1)
    msgs = [encode_examples(b) for b in batches]
    # The joiner may re-emit a message after a crash: the same example ids arrive twice.
    _produce(kafka_topics, msgs[:3] + [msgs[1], b"not an example batch"] + msgs[3:])
    summary = OnlineTrainer(_cfg(publish=False), kafka_topics).run()
    assert summary["examples_trained"] == 3000
    assert summary["duplicates_skipped"] == 500
    assert summary["bad_messages"] == 1
    topics = topic_names(kafka_topics.topic_prefix)
    assert summary["offsets"] == {f"{topics.examples}:0": 8}
    dlq = read_topic(kafka_topics, topics.dlq, stop_after=1, idle_s=2)
    assert [r.value for r in dlq] == [b"not an example batch"]


def test_a_restarted_trainer_in_the_same_group_resumes_after_committed_offsets(kafka_topics):
    batches = synthetic_examples(1000, 500, slots=3, vocab=100, seed=2)
    _produce(kafka_topics, [encode_examples(b) for b in batches])
    cfg = _cfg(publish=False)
    assert OnlineTrainer(cfg, kafka_topics).run()["examples_trained"] == 1000
    more = synthetic_examples(500, 500, slots=3, vocab=100, seed=3, first_example=10_000)
    _produce(kafka_topics, [encode_examples(b) for b in more])
    assert OnlineTrainer(cfg, kafka_topics).run()["examples_trained"] == 500


def test_a_new_replica_bootstraps_from_the_latest_snapshot_plus_deltas(kafka_topics):
    batches = synthetic_examples(6000, 300, slots=3, vocab=2000, seed=4)
    trainer = OnlineTrainer(_cfg(snapshot_interval_s=1.0, dense_sync_interval_s=0.5), kafka_topics)
    summary = _run_fed(trainer, kafka_topics, batches)
    assert summary["examples_trained"] == 6000
    topic = topic_names(kafka_topics.topic_prefix).params
    servers = kafka_topics.bootstrap_servers

    start = bootstrap_offset(servers, topic)
    assert start > 0, "several snapshots were published; the replica must skip the older ones"
    follower = ParamsFollower(servers, topic, start)
    end = follower.end_offset()
    got = []
    deadline = time.monotonic() + 30
    while (not got or got[-1][0] < end - 1) and time.monotonic() < deadline:
        got += list(follower.poll())
    follower.close()
    assert got[0][0] == start and got[0][1].kind == SNAPSHOT_BEGIN
    replica = ModelReplica("ctr")
    for _, msg in got:
        replica.apply(msg)
    assert replica.ready and replica.version == summary["published_version"]
    assert replica.watermark_ms == summary["watermark_ms"]
    table = trainer.learner.table
    for slot in trainer.learner.model_cfg.slots:
        ids = np.sort(table.ids(slot))
        np.testing.assert_array_equal(np.sort(replica.table.ids(slot)), ids)
        t = torch.from_numpy(ids)
        assert torch.equal(replica.table.lookup(slot, t), table.lookup(slot, t))
    for p, q in zip(trainer.learner.tower.state_dict().values(), replica.tower.state_dict().values()):
        assert torch.equal(p, q)


def test_every_params_message_points_at_a_complete_snapshot_begin(kafka_topics):
    batches = synthetic_examples(2000, 250, slots=2, vocab=500, seed=5)
    _run_fed(OnlineTrainer(_cfg(snapshot_interval_s=0.7), kafka_topics), kafka_topics, batches)
    records = read_topic(kafka_topics, topic_names(kafka_topics.topic_prefix).params, idle_s=1)
    msgs = {r.offset: decode_params(r.value) for r in records}
    begins = [o for o, m in msgs.items() if m.kind == SNAPSHOT_BEGIN]
    assert len(begins) >= 2
    for off, m in msgs.items():
        if m.snapshot_offset >= 0:
            assert msgs[m.snapshot_offset].kind == SNAPSHOT_BEGIN and m.snapshot_offset <= off


def test_a_cold_trainer_that_keeps_up_trains_small_batches_and_a_flooded_one_full_ones(kafka_topics):
    sizes: list[int] = []
    trickle = [encode_examples(b) for b in synthetic_examples(600, 200, slots=3, vocab=100, seed=4)]
    trainer = OnlineTrainer(_cfg(batch_size=1024, publish=False), kafka_topics)
    real_train = trainer._train
    trainer._train = lambda mb: sizes.append(len(mb)) or real_train(mb)
    try:
        while not trainer.consumer.assignment():
            trainer.step()
        _produce(kafka_topics, trickle, gap_s=0.3)  # 200 rows at a time: never a full batch pending
        deadline = time.monotonic() + 60
        while sum(sizes) < 600 and time.monotonic() < deadline:
            trainer.step()
    finally:
        trainer.close()
    assert sum(sizes) == 600 and max(sizes) <= 64  # warming up: 64-row batches
    sizes.clear()
    flood = [encode_examples(b) for b in synthetic_examples(3000, 3000, slots=3, vocab=100, seed=5,
                                                            first_example=10_000)]
    trainer = OnlineTrainer(_cfg(batch_size=1024, publish=False), kafka_topics)
    real_train = trainer._train
    trainer._train = lambda mb: sizes.append(len(mb)) or real_train(mb)
    _produce(kafka_topics, flood)  # a new group: the 600 rows above and 3000 more, at once: behind
    try:
        deadline = time.monotonic() + 60
        while sum(sizes) < 3600 and time.monotonic() < deadline:
            trainer.step()
    finally:
        trainer.close()
    assert sum(sizes) == 3600 and sizes[:3] == [1024, 1024, 1024]
