"""Where a topic ends, as every reader sees it: on a real broker whose ListOffsets is short.

Tansu answers ListOffsets(latest) with the last record batch's base offset + 1, so a reader that
trusted ``end_offsets`` started an ``end`` follow inside the last batch (re-handing old records),
called itself caught up before the last batch was applied, and took a replica's saved params
offset for "past the end" (a needless re-bootstrap). Each test sends one batch of several records.
"""

from __future__ import annotations

import threading

from streams.kafka_io import topic_names


def _send(kafka, topic: str, values: list[bytes]) -> None:
    from streams.kafka_producer import BatchProducer

    producer = BatchProducer(kafka)
    for v in values:  # sent together: one record batch
        producer.send(topic, v)
    producer.flush()
    producer.close()


def _follow(kafka, topic: str, start_at):
    from streams.topic_follower import TopicFollower

    seen: list[bytes] = []
    lock = threading.Lock()

    def handle(records):
        with lock:
            seen.extend(r.value for r in records)

    follower = TopicFollower(kafka.bootstrap_servers, topic, handle, start_at=start_at,
                             client_id="test-topic-end").start()
    return follower, seen


def test_an_end_follower_hands_over_only_what_comes_after_a_several_record_last_batch(kafka_topics):
    topic = topic_names(kafka_topics.topic_prefix).items
    _send(kafka_topics, topic, [b"old%d" % i for i in range(6)])
    follower, seen = _follow(kafka_topics, topic, "end")
    try:
        assert follower.wait_caught_up(20)
        _send(kafka_topics, topic, [b"new0", b"new1"])
        for _ in range(200):
            if len(seen) >= 2:
                break
            threading.Event().wait(0.05)
        assert seen == [b"new0", b"new1"]
    finally:
        follower.stop()
    assert follower.error is None


def test_caught_up_means_every_record_of_the_last_batch_was_handed_over(kafka_topics):
    topic = topic_names(kafka_topics.topic_prefix).items
    values = [b"r%d" % i for i in range(7)]
    _send(kafka_topics, topic, values)
    follower, seen = _follow(kafka_topics, topic, "beginning")
    try:
        assert follower.wait_caught_up(20)
        assert seen == values
        assert follower._end == {0: 7}
    finally:
        follower.stop()


def test_params_end_offset_counts_the_whole_last_batch_and_keeps_the_position(kafka_topics):
    from paramsync import ParamsFollower

    topic = topic_names(kafka_topics.topic_prefix).params
    _send(kafka_topics, topic, [b"p%d" % i for i in range(5)])
    follower = ParamsFollower(kafka_topics.bootstrap_servers, topic, offset=3)
    try:
        assert follower.end_offset() == 5
        assert follower.consumer.position(follower.tp) == 3
    finally:
        follower.close()
