"""Kafka I/O against the real embedded Tansu broker: topics, producer, manual group commits."""

import pytest

from streams.broker import BrokerConfig, BrokerError, EmbeddedBroker
from streams.kafka_consumer import GroupConsumer, next_offsets, read_topic
from streams.kafka_io import admin_client, topic_names
from streams.kafka_producer import BatchProducer


def test_broker_fixture_answers_metadata_and_has_the_topic_set(kafka_broker, kafka_topics):
    admin = admin_client(kafka_topics)
    try:
        names = set(admin.list_topics())
    finally:
        admin.close()
    assert set(topic_names(kafka_topics.topic_prefix).all()) <= names
    assert set(topic_names("hwtest").all()) <= names  # created at start


def test_create_topics_honours_partition_counts(kafka_broker):
    topics = kafka_broker.create_topics("parts", {"impressions": 3})
    admin = admin_client(kafka_broker.kafka_config("parts"))
    try:
        meta = {t["name"]: len(t["partitions"])
                for t in admin.describe_topics([topics.impressions, topics.dlq])}
    finally:
        admin.close()
    assert meta == {topics.impressions: 3, topics.dlq: 1}


def test_produced_messages_are_read_back_in_order(kafka_topics):
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    for i in range(500):
        producer.send(topics.actions, f"m{i}".encode() * 50)
    producer.flush()
    producer.close()
    got = read_topic(kafka_topics, topics.actions, stop_after=500)
    assert [r.value for r in got] == [f"m{i}".encode() * 50 for i in range(500)]


def test_group_resumes_after_the_last_committed_offset_only(kafka_topics):
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    for i in range(10):
        producer.send(topics.impressions, b"%d" % i)
    producer.flush()
    consumer = GroupConsumer(kafka_topics, [topics.impressions], group_id="g")
    got = []
    while len(got) < 10:
        got += consumer.poll(500)
    consumer.commit(next_offsets(got[:6]))  # as if only 6 were made durable
    consumer.close()
    consumer = GroupConsumer(kafka_topics, [topics.impressions], group_id="g")
    again = []
    while len(again) < 4:
        again += consumer.poll(500)
    consumer.close()
    producer.close()
    assert [r.value for r in again] == [b"6", b"7", b"8", b"9"]


def test_broker_that_cannot_start_raises_a_clear_error(tmp_path):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(BrokerError, match="exited with 3"):
        EmbeddedBroker(BrokerConfig(port=0, binary=str(fake), startup_timeout_s=5)).start()
