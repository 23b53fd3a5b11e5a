"""Two joiner processes in one consumer group share the input partitions; kill -9 of one moves its
partitions, and their pending requests, to the other: no impression lost, no label wrong (with
either emission: at window close, or early with a positive copy per click)."""

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from streams.events import example_ids
from streams.generator import GeneratorConfig, SyntheticStream, produce_synthetic
from streams.join_build import positive_copy_ids
from streams.join_positions import PendingOffsets
from streams.kafka_consumer import log_end
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer

from joinhelp import examples, examples_until

REQUESTS = 4000
PARTITIONS = 4


def start_joiner(kafka, group, state_dir, log_path, emit="window"):
    cmd = [sys.executable, "-m", "headwater", "join", "--bootstrap-servers", kafka.bootstrap_servers,
           "--topic-prefix", kafka.topic_prefix, "--group-id", group, "--state-dir", str(state_dir),
           "--window-s", "2", "--allowed-lateness-s", "2", "--poll-max-records", "100",
           "--max-close-per-step", "100", "--examples-per-message", "200", "--emit", emit]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "ab"))


def examples_end(kafka) -> int:
    from kafka import KafkaConsumer
    c = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers)
    try:
        return sum(log_end(c, topic_names(kafka.topic_prefix).examples).values())
    finally:
        c.close()


def owned(log_path) -> int:
    """How many partitions the joiner says it rebuilt from, at its latest rebuild."""
    lines = [line for line in log_path.read_text().splitlines() if "state rebuilt" in line]
    return 0 if not lines or "(assignment empty)" in lines[-1] else lines[-1].count("@")


def wait(cond, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.1)


@pytest.mark.parametrize("emit", ["window", pytest.param("early", marks=pytest.mark.slow)])
def test_kill_9_of_one_of_two_joiners_moves_its_partitions_and_pending_requests(kafka_broker,
                                                                               tmp_path, emit):
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics(prefix, {"impressions": PARTITIONS, "actions": PARTITIONS})
    kafka = kafka_broker.kafka_config(prefix)
    topics = topic_names(prefix)
    # Unpaced, the generator writes a request's clicks right after its impression, so a
    # partition's action times are out of order by up to the click delay: within the allowed
    # lateness here (the joiner's contract), so which joiner reads what when cannot matter.
    gen = GeneratorConfig(seed=11, requests=REQUESTS, users=500, items=2000,
                          max_action_delay_ms=1800)
    producer = BatchProducer(kafka)
    produce_synthetic(gen, producer, topics)
    producer.close()

    group = f"joiners-{uuid.uuid4().hex[:6]}"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = start_joiner(kafka, group, tmp_path / "a", logs[0], emit)
    b = start_joiner(kafka, group, tmp_path / "b", logs[1], emit)
    try:
        # Both own input partitions (the group split them) and the output is mid-stream.
        wait(lambda: owned(logs[0]) > 0 and owned(logs[1]) > 0 and examples_end(kafka) >= 10, 90,
             lambda: logs[0].read_text()[-1500:] + logs[1].read_text()[-1500:])
        assert owned(logs[0]) + owned(logs[1]) == 2 * PARTITIONS  # both topics, co-partitioned
        before_kill = examples_end(kafka)
        os.kill(a.pid, signal.SIGKILL)
        assert a.wait(10) == -signal.SIGKILL
        # The survivor takes every partition once the dead member's session expires.
        wait(lambda: owned(logs[1]) == 2 * PARTITIONS, 60, lambda: logs[1].read_text()[-2000:])

        blocks = list(SyntheticStream(gen).blocks(REQUESTS))
        expected = np.concatenate([example_ids(f"g11-{blk.request_index[r]}", blk.items[r])
                                   for blk in blocks for r in range(len(blk.request_index))])
        # A click counts when it comes within the 2 s window (all of them, here).
        in_window = [blk.clicked & (blk.click_time_ms - blk.event_time_ms[:, None] <= 2000)
                     for blk in blocks]
        clicked = np.concatenate([w[r] for w, blk in zip(in_window, blocks)
                                  for r in range(len(blk.request_index))]).astype(np.float32)
        if emit == "early":  # every item once as a negative, each click again as a positive copy
            copies = positive_copy_ids(expected[clicked == 1])
            expected = np.concatenate([expected, copies])
            clicked = np.concatenate([np.zeros(len(clicked), np.float32),
                                      np.ones(len(copies), np.float32)])
        got = examples_until(kafka, len(np.unique(expected)))
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert before_kill < examples_end(kafka)  # the kill was mid-stream
    # Every impression item is there, and the trainer's de-dup (first copy of an id wins) sees
    # the right label for each: a re-emitted example never comes before its original.
    ids, first = np.unique(got.example_id, return_index=True)
    missing = np.setdiff1d(expected, ids)
    truth = dict(zip(expected.tolist(), clicked.tolist()))
    assert len(missing) == 0, (f"{len(missing)} missing, {sum(truth[i] for i in missing.tolist())} "
                               f"of them positives")
    np.testing.assert_array_equal(ids, np.sort(expected))
    labels = got.label[first]
    wrong = [i for i, y in zip(ids.tolist(), labels.tolist()) if truth[i] != y]
    assert wrong == [], f"{len(wrong)} examples with the wrong label"
    assert clicked.sum() > 100  # the check means something


def test_the_restart_offset_is_the_oldest_record_still_pending():
    pos = PendingOffsets()
    tp = ("hw.impressions", 0)
    for offset in range(10):
        pos.read(tp, offset)
    pos.hold(tp, [2, 5, 7])
    pos.hold(tp, [5])  # a record with two events in the state
    assert pos.restart_offsets() == {tp: 2}
    pos.release(tp, [2])
    assert pos.restart_offsets() == {tp: 5}
    pos.release(tp, [5])
    assert pos.restart_offsets() == {tp: 5}  # one of its events is still pending
    pos.release(tp, [5, 7])
    assert pos.restart_offsets() == {tp: 10}  # nothing pending: everything read is done
    for offset in range(10, 5000):  # a long stream: the counters are trimmed behind the restart
        pos.read(tp, offset)
        pos.hold(tp, [offset])
        pos.release(tp, [offset])
    pos.hold(tp, [4999])
    assert pos.restart_offsets() == {tp: 4999} and pos.pending() == 1


def test_a_release_without_its_hold_is_an_error():
    pos = PendingOffsets()
    tp = ("hw.actions", 1)
    pos.read(tp, 0)
    try:
        pos.release(tp, [0])
    except RuntimeError:
        return
    raise AssertionError("releasing an event never held must raise")


def test_repeated_impressions_and_actions_do_not_pin_the_committed_offset(kafka_topics, tmp_path):
    """A producer retry repeats a message; the repeat replaces the stored event, and the one it
    replaced must stop holding the restart offset back (else every restart re-reads from it)."""
    from streams.events import Action, Impression, Watermark
    from streams.joiner import OnlineJoiner

    from joinhelp import joiner_config, run_until, send

    imp = Impression("r1", 1, 1000, [5, 6])
    click = [Action("r1", 1, 6, "click", 1.0, 1200)]
    send(kafka_topics, [imp, imp], [click, click])  # repeats read in one step
    joiner = OnlineJoiner(joiner_config(kafka_topics, tmp_path))
    run_until(joiner, lambda: joiner.max_time == 1000 and joiner.positions.pending() == 2)
    send(kafka_topics, [imp], [click], watermark=Watermark(10 * 60_000))  # and in a later one
    run_until(joiner, lambda: joiner.state.count_pending() == 0 and joiner.watermark > 0)
    topics = topic_names(kafka_topics.topic_prefix)
    # 3 impressions + a watermark, 3 actions + a watermark: nothing left to re-read
    assert joiner.positions.restart_offsets() == {(topics.impressions, 0): 4,
                                                  (topics.actions, 0): 4}
    assert joiner.positions.pending() == 0
    joiner.close()
    labels = examples(kafka_topics)
    assert sorted(set(zip(labels.item_id.tolist(), labels.label.tolist()))) == [(5, 0.0), (6, 1.0)]
