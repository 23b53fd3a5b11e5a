"""As of when a consumer's view of each partition's end is true.

kafka-python keeps a partition's high watermark from the last fetch answer it *parsed*, and that
can be old: no fetch is sent for a partition whose earlier answer is still queued, a paused one is
not fetched, and a busy process parses answers late (an answer waits in the queue behind the
records of other partitions). A rule that reads "read to its end and quiet" from that view (the
joiner's idle input partitions, :mod:`streams.join_watermark`) must also know *as of when* it
holds: seen on a loaded box, a joiner took an action partition for idle on a high watermark
fetched before any action was produced, and closed requests whose clicks sat unread in it.

:class:`FetchAnswers` records, per partition, the send time of the newest fetch whose answer has
been applied: the broker answered after that time, so the high watermark read from it is at
least that fresh. It hooks kafka-python's fetcher (the version is pinned in pyproject.toml; a
test fails if the hooks stop being called). An incremental fetch session leaves a partition with
nothing new out of the answer, so a consumer that tracks answers turns sessions off: every answer
then names every partition it was asked for.
"""

from __future__ import annotations

from kafka import KafkaConsumer, TopicPartition

Partition = tuple[str, int]


class FetchAnswers:
    """``answered[(topic, partition)]``: monotonic send time of the newest applied fetch answer."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.answered: dict[Partition, float] = {}
        self._sent: dict[TopicPartition, float] = {}  # answered, still queued unparsed
        fetcher = consumer._fetcher
        handle, parse = fetcher._handle_fetch_response, fetcher._parse_fetched_data

        def on_response(node_id, fetch_offsets, send_time, response):
            handle(node_id, fetch_offsets, send_time, response)
            for tp in fetch_offsets:
                self._sent[tp] = send_time

        def on_parse(completed_fetch):
            tp = completed_fetch.topic_partition
            sent = self._sent.pop(tp, None)
            parsed = parse(completed_fetch)
            data = completed_fetch.partition_data
            # Only an answer that was applied: no error, not discarded as stale (a seek since).
            if sent is not None and parsed is not None and data.error_code == 0 and data.high_watermark >= 0:
                self.answered[(tp.topic, tp.partition)] = sent
            return parsed

        fetcher._handle_fetch_response = on_response  # both are looked up on the instance
        fetcher._parse_fetched_data = on_parse
