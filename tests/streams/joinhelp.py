"""Helpers shared by the joiner tests (not a test module)."""

from __future__ import annotations

import time

import numpy as np

from streams.events import ExampleBatch, decode_dead_letter, decode_examples, encode_event
from streams.joiner import JoinerConfig, OnlineJoiner
from streams.kafka_consumer import read_topic
from streams.kafka_io import KafkaConfig, topic_names
from streams.kafka_producer import BatchProducer


def send(kafka: KafkaConfig, impressions=(), actions=(), watermark=None) -> None:
    topics = topic_names(kafka.topic_prefix)
    producer = BatchProducer(kafka)
    for imp in impressions:
        producer.send(topics.impressions, encode_event(imp))
    for a in actions:
        producer.send(topics.actions, encode_event(a))
    if watermark is not None:
        producer.send(topics.impressions, encode_event(watermark))
        producer.send(topics.actions, encode_event(watermark))
    producer.flush()
    producer.close()


def joiner_config(kafka: KafkaConfig, tmp_path, **kw) -> JoinerConfig:
    return JoinerConfig(bootstrap_servers=kafka.bootstrap_servers, topic_prefix=kafka.topic_prefix,
                        state_dir=str(tmp_path / "state"), window_s=kw.pop("window_s", 60.0),
                        allowed_lateness_s=kw.pop("allowed_lateness_s", 0.0), **kw)


def run_until(joiner: OnlineJoiner, done, max_steps: int = 400) -> None:
    for _ in range(max_steps):
        joiner.step(timeout_ms=100)
        if done():
            return


def examples(kafka: KafkaConfig, idle_s: float = 1.0) -> ExampleBatch:
    recs = read_topic(kafka, topic_names(kafka.topic_prefix).examples, idle_s=idle_s)
    return ExampleBatch.concat([decode_examples(r.value) for r in recs])


def examples_until(kafka: KafkaConfig, want: int, timeout_s: float = 120.0) -> ExampleBatch:
    """``hw.examples`` as soon as it holds ``want`` distinct example ids (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    got = examples(kafka, idle_s=0.5)
    while len(np.unique(got.example_id)) < want and time.monotonic() < deadline:
        time.sleep(1.0)
        got = examples(kafka, idle_s=0.5)
    return got


def dead_letters(kafka: KafkaConfig, which: str, idle_s: float = 1.0):
    topic = getattr(topic_names(kafka.topic_prefix), which)
    return [decode_dead_letter(r.value) for r in read_topic(kafka, topic, idle_s=idle_s)]


def unique_ids(batch: ExampleBatch) -> np.ndarray:
    return np.unique(batch.example_id)
