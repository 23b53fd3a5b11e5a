"""GroupConsumer.rewind_to_committed: back to the committed offsets between polls without a
ListOffsets request (Tansu on S3 storage answers those in seconds on a long log, longer than
the group's poll interval), and input lost to retention is reported, not skipped silently."""

import logging
import time

from streams.kafka_consumer import GroupConsumer, Record
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer


def _read(consumer: GroupConsumer, n: int, seconds: float = 30.0) -> list:
    got, deadline = [], time.monotonic() + seconds
    while len(got) < n and time.monotonic() < deadline:
        got += consumer.poll(200)
    return got


def test_rewind_reads_again_from_the_commit_with_no_list_offsets(kafka_topics):
    topics = topic_names(kafka_topics.topic_prefix)
    producer = BatchProducer(kafka_topics)
    consumer = GroupConsumer(kafka_topics, [topics.impressions], group_id="rewind",
                             fetch_max_wait_ms=50)
    try:
        for i in range(6):
            producer.send(topics.impressions, b"%d" % i)
        producer.flush()
        first = _read(consumer, 6)
        assert [r.value for r in first] == [b"%d" % i for i in range(6)]
        tp = (first[0].topic, first[0].partition)
        consumer.commit({tp: first[3].offset})  # records 3, 4, 5 were not made durable

        calls = []
        inner = consumer._consumer
        for name in ("beginning_offsets", "end_offsets", "offsets_for_times"):
            setattr(inner, name, lambda *a, _n=name, **k: calls.append(_n))
        owned = consumer.rewind_to_committed()
        assert owned[tp] == first[3].offset
        again = _read(consumer, 3)
        assert [r.value for r in again] == [b"3", b"4", b"5"]
        assert calls == [] and consumer.skipped == 0
    finally:
        consumer.close()
        producer.close()


def test_a_gap_after_the_rewind_is_reported(kafka_topics, caplog):
    consumer = GroupConsumer(kafka_topics, [topic_names(kafka_topics.topic_prefix).impressions],
                             group_id="gap")
    try:
        consumer._rewound = {("t", 0): 10, ("t", 1): 4}
        with caplog.at_level(logging.ERROR, logger="streams.kafka_consumer"):
            consumer._check_rewound([Record("t", 0, 17, b"", None, 0), Record("t", 0, 18, b"", None, 0),
                                     Record("t", 1, 4, b"", None, 0)])
        assert consumer.skipped == 7  # offsets 10..16 of t[0]; t[1] starts where it was committed
        assert "records 10..16" in caplog.text and consumer._rewound == {}
    finally:
        consumer.close()
