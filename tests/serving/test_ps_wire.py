"""The sharded hw.params layout: wire version 2 names the shard, unsharded stays version 1, and a
topic with too few partitions is a clear error before anything is published."""

import uuid

import msgpack
import pytest
from kafka import KafkaProducer

from embedding_store import EmbeddingTable, SlotConfig
from paramsync import (CONTROL_SHARD, SNAPSHOT_END, ParamsMessage, ParamsWireError, control_partition,
                       decode_params, encode_params, ensure_params_partitions, params_partitions)
from training.sync import DeltaPublisher, SyncConfig


def test_sharded_headers_round_trip_and_unsharded_ones_keep_wire_version_1():
    msg = ParamsMessage(kind=SNAPSHOT_END, model_id="m", version=3, shard=CONTROL_SHARD, num_shards=4,
                        created_ms=7)
    assert decode_params(encode_params(msg)) == msg
    assert msgpack.unpackb(encode_params(msg))["w"] == 2
    plain = ParamsMessage(kind=SNAPSHOT_END, model_id="m", version=3, created_ms=7)
    raw = msgpack.unpackb(encode_params(plain))
    assert raw["w"] == 1 and "sh" not in raw and "ns" not in raw  # old readers still read it
    assert decode_params(encode_params(plain)) == plain


@pytest.mark.parametrize("shard,num", [(4, 4), (-2, 4), (0, 0)])
def test_a_shard_outside_its_layout_is_a_wire_error(shard, num):
    raw = msgpack.unpackb(encode_params(ParamsMessage(kind="dense", model_id="m", version=1, shard=1, num_shards=4)))
    raw.update(sh=shard, ns=num)
    with pytest.raises(ParamsWireError, match="out of range"):
        decode_params(msgpack.packb(raw))


def test_partition_layout():
    assert (params_partitions(1), control_partition(1)) == (1, 0)
    assert (params_partitions(4), control_partition(4)) == (5, 4)
    with pytest.raises(ValueError):
        params_partitions(0)


def test_the_topic_gets_its_partitions_or_a_clear_error(kafka_broker):
    prefix = f"pswire{uuid.uuid4().hex[:8]}"
    bootstrap = kafka_broker.bootstrap_servers
    assert ensure_params_partitions(bootstrap, f"{prefix}.fresh", 3) == 4  # created with N + 1
    topics = kafka_broker.create_topics(prefix)  # hw.params with 1 partition
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        table = EmbeddingTable([SlotConfig(name="a", dim=2)])
        with pytest.raises(ValueError, match="needs 3"):
            DeltaPublisher(producer, topics.params, table, lambda: b"", SyncConfig(num_param_shards=2))
        try:  # a broker that can add partitions does; one that cannot (Tansu) says what to do
            assert ensure_params_partitions(bootstrap, topics.params, 2) == 3
        except RuntimeError as exc:
            assert "recreate the topic with 3 partitions" in str(exc)
    finally:
        producer.close()
