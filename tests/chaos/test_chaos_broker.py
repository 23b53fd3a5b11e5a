"""Broker faults: Tansu on durable S3 storage (a loopback S3 server) is killed mid-stream and
started again. Producers retry and buffer through the outage; every acknowledged message is
still there; a consumer group resumes from the offsets it committed before the crash.

(With an *idempotent* producer this failed about half the time on Tansu 0.6.0: the batch in
flight at the crash was acknowledged and missing. Hence ``KafkaConfig.idempotence`` is off.)"""

from __future__ import annotations

import threading
import time

import pytest
from kafka.errors import KafkaError

from streams.broker import BrokerConfig, EmbeddedBroker, LocalS3Server
from streams.kafka_consumer import GroupConsumer, read_topic
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer


class _Producing(threading.Thread):
    """Sends numbered messages, flushing every 50; ``acked`` is what a flush confirmed."""

    def __init__(self, cfg, topic: str) -> None:
        super().__init__(daemon=True)
        self.producer, self.topic = BatchProducer(cfg), topic
        self.acked = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set():
                for _ in range(50):
                    self.producer.send(self.topic, b"m%d" % i)
                    i += 1
                self.producer.flush(timeout_s=60)
                self.acked = i
                time.sleep(0.02)
        except BaseException as exc:  # surfaced to the test
            self.error = exc
        finally:
            self.producer.close()


def _consume(consumer: GroupConsumer, seconds: float, join_timeout_s: float = 60.0) -> list[int]:
    """Reads (committing as it goes) for ``seconds`` after the first record (joining the group
    takes Tansu a few seconds)."""
    offsets, deadline = [], time.monotonic() + join_timeout_s
    while time.monotonic() < deadline:
        recs = consumer.poll(timeout_ms=200)
        if recs and not offsets:
            deadline = time.monotonic() + seconds
        offsets += [r.offset for r in recs]
        if recs:
            consumer.commit({(recs[-1].topic, recs[-1].partition): recs[-1].offset + 1})
    return offsets


@pytest.mark.parametrize("down_s", [2.0, pytest.param(10.0, marks=pytest.mark.slow)])
def test_kill9_broker_on_s3_storage_loses_nothing_acknowledged(down_s):
    with LocalS3Server() as s3:
        broker = EmbeddedBroker(BrokerConfig(port=0, storage=s3.storage_url,
                                             s3_endpoint=s3.endpoint)).start()
        try:
            cfg = broker.kafka_config("hw")
            cfg.max_poll_interval_ms = 1000  # Tansu's join waits out the rebalance timeout
            topic = topic_names("hw").impressions
            producing = _Producing(cfg, topic)
            producing.start()
            consumer = GroupConsumer(cfg, [topic], group_id="chaos-g")
            seen = _consume(consumer, 2.0)
            assert seen, "the consumer read nothing before the fault"
            committed = seen[-1] + 1
            consumer.close()
            acked_before = producing.acked

            broker.kill()
            time.sleep(down_s)
            broker.start()  # same port; topics, data and group offsets come back from S3

            # A fresh member of the group starts where the group committed, not at 0 or the end.
            consumer = GroupConsumer(cfg, [topic], group_id="chaos-g")
            resumed = _consume(consumer, 2.0)
            consumer.close()
            producing.stop.set()
            producing.join(90)
            assert producing.error is None, producing.error
            assert producing.acked > acked_before, "no progress after the broker came back"
            records = read_topic(cfg, topic, idle_s=1.5)
            # It resumes at the first record at or after the committed offset, which need not be
            # the committed offset itself: offsets may skip, as in Kafka. One full-suite run in
            # about six resumed at 14450 after committing 14400 (a 50-record batch, the one in
            # flight at the kill, can take its offsets without its records landing; its retry,
            # unacknowledged until then, takes new ones). Skipping a record still fails here.
            assert resumed and resumed[0] == min(r.offset for r in records
                                                 if r.offset >= committed)

            values = [r.value for r in records]
            got = {int(v[1:]) for v in values}
            assert set(range(producing.acked)) <= got  # every acknowledged message survived
            # Retries across the crash may repeat a batch (at-least-once; consumers de-dup by id).
            assert len(values) - len(got) <= 200
        finally:
            broker.stop()


def test_memory_storage_is_not_durable():
    """The control: the same crash on the default in-memory engine loses the data, which is why
    the fault runs use S3 storage."""
    broker = EmbeddedBroker(BrokerConfig(port=0)).start()
    try:
        cfg = broker.kafka_config("hw")
        topic = topic_names("hw").impressions
        producer = BatchProducer(cfg)
        for i in range(100):
            producer.send(topic, b"m%d" % i)
        producer.flush()
        producer.close()
        broker.kill()
        broker.start()
        try:
            assert read_topic(cfg, topic, idle_s=1.0, timeout_s=10) == []
        except KafkaError:
            pass  # or the topic itself is gone
    finally:
        broker.stop()
