"""``headwater train --nproc 2`` end to end on the real broker: two ranks, two partitions, one group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from embedding_store import EmbeddingTable
from embedding_store.sharding import shard_of
from paramsync import ParamsFollower, params_partitions
from serving.replica import ModelReplica
from streams.events import encode_examples
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer
from training.checkpoint import CheckpointStore
from training.distributed.checkpoint import SHARDED_MANIFEST
from training.synthetic import synthetic_examples


PS_SHARDS = 3  # serving PS shards: hw.params partitions 0..2 (rows) and 3 (the tower)


def _fill(kafka, batches):
    topic = topic_names(kafka.topic_prefix).examples
    producer = BatchProducer(kafka)
    for i, b in enumerate(batches):
        producer.send(topic, encode_examples(b), partition=i % 2)
    producer.flush()
    producer.close()


def _train(kafka, ckpt, nproc, until):
    cmd = [sys.executable, "-m", "headwater", "train", "--nproc", str(nproc), "--json",
           "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
           "--group-id", f"dist-{uuid.uuid4().hex[:6]}", "--batch-size", "300", "--hidden", "16,8",
           "--max-examples", str(until), "--idle-exit-s", "20", "--max-batch-wait-ms", "50", "--sparse-sync-interval-s", "0.2",
           "--checkpoint-dir", str(ckpt), "--checkpoint-interval-s", "1000", "--torch-threads", "1",
           "--num-param-shards", str(PS_SHARDS)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _replica(kafka, partition):
    topic = topic_names(kafka.topic_prefix).params
    follower = ParamsFollower(kafka.bootstrap_servers, topic, 0, partition=partition)
    end = follower.end_offset()
    got, deadline = [], time.monotonic() + 30
    while (not got or got[-1][0] < end - 1) and time.monotonic() < deadline:
        got += list(follower.poll())
    follower.close()
    replica = ModelReplica("ctr")
    for _, msg in got:
        replica.apply(msg)
    return replica


@pytest.fixture(scope="module")
def two_rank_run(kafka_broker, tmp_path_factory):
    prefix = f"dist-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics(prefix, {"examples": 2, "params": params_partitions(PS_SHARDS)})
    kafka = kafka_broker.kafka_config(prefix)
    _fill(kafka, synthetic_examples(2400, 300, slots=3, vocab=300, seed=5))
    ckpt = tmp_path_factory.mktemp("dist-kafka") / "ckpt"
    return kafka, ckpt, _train(kafka, ckpt, 2, until=2400)


def test_two_ranks_train_their_partitions_checkpoint_and_publish_one_model(two_rank_run):
    kafka, ckpt, summary = two_rank_run
    assert summary["world_size"] == 2 and summary["rank"] == 0
    assert summary["global_examples_trained"] == 2400
    assert summary["exchange"]["calls"] > 0 and 0 < summary["exchange"]["share"] < 1

    manifest = json.loads((ckpt / SHARDED_MANIFEST).read_text())
    examples = topic_names(kafka.topic_prefix).examples
    assert manifest["world_size"] == 2 and manifest["examples_trained"] == 2400
    assert manifest["offsets"] == {f"{examples}:0": 4, f"{examples}:1": 4}

    from training.checkpoint import CheckpointStore

    shards = [EmbeddingTable.load(str(CheckpointStore(ckpt / e["dir"]).table_path)) for e in manifest["shards"]]
    owned = {slot: [t.ids(slot) for t in shards] for slot in ("user_id", "item_id", "f00")}
    for slot, per_rank in owned.items():
        for r, ids in enumerate(per_rank):
            assert ids.size and (shard_of(ids, 2) == r).all()
    # Each PS shard's partition holds exactly its rows, gathered from both trainer ranks by one
    # collective snapshot plus both ranks' deltas; every partition's snapshot carries the tower.
    for p in range(PS_SHARDS):
        replica = _replica(kafka, p)
        assert replica.ready and replica.tower is not None
        for slot, per_rank in owned.items():
            every = np.concatenate(per_rank)
            want = np.sort(every[shard_of(every, PS_SHARDS) == p])
            assert all(np.isin(want, ids).any() for ids in per_rank)  # rows from both ranks
            np.testing.assert_array_equal(np.sort(replica.table.ids(slot)), want)


@pytest.mark.slow
def test_one_rank_resumes_the_two_rank_checkpoint_and_trains_only_new_examples(two_rank_run):
    kafka, ckpt, _ = two_rank_run
    before = json.loads((ckpt / SHARDED_MANIFEST).read_text())
    shards = [EmbeddingTable.load(str(CheckpointStore(ckpt / e["dir"]).table_path)) for e in before["shards"]]
    _fill(kafka, synthetic_examples(600, 300, slots=3, vocab=300, seed=6, first_example=10_000))
    again = _train(kafka, ckpt, 1, until=3000)
    assert again["world_size"] == 1
    assert again["global_examples_trained"] == 3000  # 2400 restored + 600 new ...
    examples = topic_names(kafka.topic_prefix).examples
    after = json.loads((ckpt / SHARDED_MANIFEST).read_text())
    # ... and the 3000th was the last new one: the old messages were skipped, not trained again.
    assert after["offsets"] == {f"{examples}:0": 5, f"{examples}:1": 5}
    one = EmbeddingTable.load(str(CheckpointStore(ckpt / "shard-000-of-001").table_path))
    assert set(np.concatenate([t.ids("user_id") for t in shards])) <= set(one.ids("user_id"))
    assert not (ckpt / "shard-001-of-002").exists()  # old layout dropped


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_cleanly_with_a_checkpoint(kafka_broker, tmp_path):
    import signal

    prefix = f"dist-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics(prefix, {"examples": 2})
    kafka = kafka_broker.kafka_config(prefix)
    _fill(kafka, synthetic_examples(1200, 300, slots=3, vocab=300, seed=7))
    cmd = [sys.executable, "-m", "headwater", "train", "--nproc", "2", "--json",
           "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", prefix,
           "--group-id", "sigterm", "--batch-size", "300", "--hidden", "16,8",
           "--checkpoint-dir", str(tmp_path), "--checkpoint-interval-s", "1000"]
    log = tmp_path / "train.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 180
        while "rank 0: snapshot" not in log.read_text():  # the ranks trained their first step
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    summary = json.loads(out.strip().splitlines()[-1])
    manifest = json.loads((tmp_path / SHARDED_MANIFEST).read_text())
    assert summary["global_examples_trained"] == manifest["examples_trained"] > 0
