"""GroupConsumer back-pressure: pause() stops fetching but keeps membership; resume() fetches again."""

import time

import pytest

from streams.kafka_consumer import GroupConsumer
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer


def _poll_for(consumer: GroupConsumer, seconds: float) -> list:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += consumer.poll(200)
    return got


def test_paused_consumer_fetches_nothing_until_resumed(kafka_topics):
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    consumer = GroupConsumer(kafka_topics, [topics.impressions], group_id="pause",
                             fetch_max_wait_ms=50)
    try:
        producer.send(topics.impressions, b"first")
        producer.flush()
        got = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            got += consumer.poll(200)
        assert [r.value for r in got] == [b"first"]

        consumer.pause()
        assert consumer.paused() == consumer.assignment() != set()
        for i in range(5):
            producer.send(topics.impressions, b"%d" % i)
        producer.flush()
        assert _poll_for(consumer, 2.0) == []  # polls keep membership, fetch nothing
        # What the last fetch said of the end went stale meanwhile ("read to its end").
        assert consumer.partitions_behind() == set()

        consumer.resume()
        assert consumer.paused() == set()
        # ... so until a fetch answers, a resumed partition counts as behind: the joiner's
        # watermark must not treat it as idle while its new messages are unread.
        assert consumer.partitions_behind() == consumer.assignment()
        later = []
        deadline = time.monotonic() + 30
        while len(later) < 5 and time.monotonic() < deadline:
            later += consumer.poll(200)
        assert [r.value for r in later] == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        consumer.close()
        producer.close()


def test_negative_fetch_wait_is_rejected(kafka_topics):
    with pytest.raises(ValueError, match="fetch_max_wait_ms"):
        GroupConsumer(kafka_topics, ["x"], group_id="g", fetch_max_wait_ms=-1)
