"""The producer side of reliability: oversized messages refused up front, outages bridged within a
bound and failures past it surfaced (never dropped), the joiner's output chunked under the limit."""

from __future__ import annotations

import time

import numpy as np
import pytest

from streams.broker import BrokerConfig, EmbeddedBroker
from streams.events import ExampleBatch, Ragged, decode_examples
from streams.events import encode_chunks
from streams.kafka_consumer import read_topic
from streams.kafka_io import KafkaConfig, topic_names
from streams.kafka_producer import BatchProducer, MessageTooLargeError, ProducerBoundError


def test_oversized_message_is_refused_before_sending_with_topic_and_size(kafka_topics):
    cfg = KafkaConfig(bootstrap_servers=kafka_topics.bootstrap_servers,
                      topic_prefix=kafka_topics.topic_prefix, max_message_bytes=10_000)
    topic = topic_names(cfg.topic_prefix).impressions
    producer = BatchProducer(cfg)
    try:
        with pytest.raises(MessageTooLargeError) as err:
            producer.send(topic, b"x" * 10_001)
        assert topic in str(err.value) and "10001 bytes" in str(err.value)
        assert producer.sent == 0
        producer.send(topic, b"y" * 10_000)  # exactly at the limit: accepted and delivered
        producer.flush()
    finally:
        producer.close()
    assert [r.value for r in read_topic(cfg, topic, idle_s=0.5)] == [b"y" * 10_000]


def _wide_batch(n: int, values_per_row: int) -> ExampleBatch:
    ids = np.arange(n, dtype=np.int64)
    return ExampleBatch(
        example_id=ids, user_id=ids % 7, item_id=ids * 3, label=np.zeros(n, np.float32),
        sample_rate=np.ones(n, np.float32), event_time_ms=np.full(n, 1_700_000_000_000, np.int64),
        sparse={"user_id": Ragged(ids % 7, np.ones(n, np.int32)),
                "item_id": Ragged(ids * 3, np.ones(n, np.int32)),
                "history": Ragged(np.arange(n * values_per_row, dtype=np.int64) * 7919,
                                  np.full(n, values_per_row, np.int32))},
        dense=np.zeros((n, 0), np.float32), truth_p=np.full(n, np.nan, np.float32))


def test_joiner_output_is_chunked_under_the_message_limit():
    batch = _wide_batch(1000, values_per_row=50)
    chunks = encode_chunks(batch, per_message=4096, max_bytes=40_000)
    assert len(chunks) > 1
    assert all(len(c) <= 40_000 for c in chunks)
    decoded = [decode_examples(c) for c in chunks]
    assert np.array_equal(np.concatenate([d.example_id for d in decoded]), batch.example_id)
    assert np.array_equal(np.concatenate([d.sparse["history"].values for d in decoded]),
                          batch.sparse["history"].values)


def test_failures_past_the_delivery_bound_are_raised_not_dropped():
    with EmbeddedBroker(BrokerConfig(port=0)) as broker:
        _delivery_bound(broker)


def _delivery_bound(broker: EmbeddedBroker) -> None:
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap_servers, delivery_timeout_ms=1500,
                      max_block_ms=300, buffer_memory=5000)
    topic = topic_names("hw").impressions
    producer = BatchProducer(cfg)
    try:
        producer.send(topic, b"before")
        producer.flush()
        broker.kill()
        producer.send(topic, b"a" * 3000)  # buffered: nothing acknowledged it yet
        t0 = time.monotonic()
        with pytest.raises(ProducerBoundError, match="buffer_memory=5000"):
            producer.send(topic, b"b" * 3000)  # would exceed the buffer: blocks 300 ms, then fails
        assert 0.25 < time.monotonic() - t0 < 5
        deadline = time.monotonic() + 30
        with pytest.raises(ProducerBoundError, match=f"{topic}.*delivery_timeout_ms=1500"):
            while time.monotonic() < deadline:  # the buffered send expires: the next send says so
                producer.send(topic, b"c")
                time.sleep(0.1)
    finally:
        producer.close()
