"""The ledger reads every partition of a topic to its end: with the input split over several
partitions (``--joiners 2``), a read that stopped at partition 0's end offset missed requests
and counted their sampled-out items as lost (seen under load in the short chaos run)."""

from __future__ import annotations

import uuid

from headwater.chaos.accounting import _read, log_ends
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer


def test_the_ledger_reads_every_partition_of_a_topic_to_its_end(kafka_broker):
    prefix = f"chaos-read-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics(prefix, {"impressions": 3})
    kafka = kafka_broker.kafka_config(prefix)
    topic = topic_names(prefix).impressions
    producer = BatchProducer(kafka, client_id="read-test")
    n = 12_000  # more than one poll of read_topic returns
    for i in range(n):
        producer.send(topic, i.to_bytes(4, "big"), key=str(i).encode())
    producer.flush()
    producer.close()
    ends = log_ends(kafka, topic)
    assert len(ends) == 3 and sum(ends.values()) == n and min(ends.values()) > 0
    values = _read(kafka, topic)
    assert sorted(int.from_bytes(v, "big") for v in values) == list(range(n))
