"""Crash safety: kill -9 a real joiner process mid-stream; after restart nothing is lost."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from streams.events import example_ids
from streams.generator import GeneratorConfig, SyntheticStream, produce_synthetic
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer

from joinhelp import examples_until

REQUESTS = 3000


def start_joiner(kafka, state_dir, log_path):
    cmd = [sys.executable, "-m", "headwater", "join", "--bootstrap-servers", kafka.bootstrap_servers,
           "--topic-prefix", kafka.topic_prefix, "--state-dir", str(state_dir),
           "--window-s", "2", "--allowed-lateness-s", "0.5", "--poll-max-records", "100",
           "--max-close-per-step", "100", "--examples-per-message", "500"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"))


def end_offset(kafka, topic):
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    try:
        tp = TopicPartition(topic, 0)
        return c.end_offsets([tp])[tp]
    finally:
        c.close()


def test_kill_9_mid_stream_loses_no_impression_and_duplicates_share_ids(kafka_topics, tmp_path):
    topics = topic_names(kafka_topics.topic_prefix)
    gen = GeneratorConfig(seed=7, requests=REQUESTS, users=500, items=2000)
    producer = BatchProducer(kafka_topics)
    produce_synthetic(gen, producer, topics)
    producer.close()

    log_path = tmp_path / "joiner.log"
    proc = start_joiner(kafka_topics, tmp_path / "state", log_path)
    try:
        deadline = time.monotonic() + 60
        while end_offset(kafka_topics, topics.examples) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        produced_before_kill = end_offset(kafka_topics, topics.examples)
        assert produced_before_kill >= 20, log_path.read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()

    expected = np.sort(np.concatenate([
        example_ids(f"g7-{b.request_index[r]}", b.items[r])
        for b in SyntheticStream(gen).blocks(REQUESTS) for r in range(len(b.request_index))]))
    proc = start_joiner(kafka_topics, tmp_path / "state", log_path)
    try:
        got = examples_until(kafka_topics, len(np.unique(expected)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # clean stop on SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    unique = np.unique(got.example_id)
    assert produced_before_kill < end_offset(kafka_topics, topics.examples)  # it was mid-stream
    np.testing.assert_array_equal(unique, expected)  # every impression item: exactly one example
    assert len(got) >= len(expected)  # duplicates allowed; de-dup by example_id above
