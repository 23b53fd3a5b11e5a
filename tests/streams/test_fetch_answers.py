"""A consumer knows as of when its view of each partition's end is true (real broker): the send
time of the newest fetch answer it applied advances while it polls, and not while the partition
is paused (no fetch asks for it). If kafka-python stops calling the hooks, these fail."""

from __future__ import annotations

import time

import pytest

from streams.kafka_consumer import GroupConsumer
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer


def _poll_for(consumer: GroupConsumer, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        consumer.poll(timeout_ms=100)


def test_fetch_answers_advance_while_polling_and_stop_while_paused(kafka_topics):
    topic = topic_names(kafka_topics.topic_prefix).actions
    producer = BatchProducer(kafka_topics, client_id="answers-test")
    producer.send(topic, b"one")
    producer.flush()
    consumer = GroupConsumer(kafka_topics, [topic], group_id="answers", track_fetch_answers=True,
                             fetch_max_wait_ms=100)
    try:
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)
        tp = (topic, 0)
        assert consumer.assignment() == {tp}
        t0 = time.monotonic()
        _poll_for(consumer, 1.5)
        first = consumer.fetch_answered()[tp]
        assert first >= t0  # a fetch sent after t0 was answered and applied
        assert consumer.partitions_behind() == set()  # read to its end, as of `first`

        consumer.pause()
        _poll_for(consumer, 0.3)  # an answer already in flight may still land
        t1 = time.monotonic()
        producer.send(topic, b"two")  # unread, and nobody asks the broker about it
        producer.flush()
        _poll_for(consumer, 1.0)
        paused_answer = consumer.fetch_answered()[tp]
        assert paused_answer < t1
        assert consumer.partitions_behind() == set()  # the stale view: why the send time matters

        consumer.resume()
        t2 = time.monotonic()
        got = []
        while time.monotonic() < t2 + 10 and not got:
            got = consumer.poll(timeout_ms=100)
        assert [r.value for r in got] == [b"two"]
        _poll_for(consumer, 0.5)
        assert consumer.fetch_answered()[tp] >= t2
    finally:
        consumer.close()
        producer.close()


def test_a_consumer_without_tracking_says_so(kafka_topics):
    consumer = GroupConsumer(kafka_topics, [topic_names(kafka_topics.topic_prefix).actions], group_id="plain")
    try:
        with pytest.raises(RuntimeError, match="track_fetch_answers"):
            consumer.fetch_answered()
    finally:
        consumer.close()
