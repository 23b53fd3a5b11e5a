"""The batched producer every stage writes with: bounded through broker outages, never lossy.

Why a wrapper: kafka-python 3 has no bound on unacknowledged bytes and reports a lost send only
to a callback; a stage that commits its input after :meth:`BatchProducer.flush` needs the flush
to prove every send landed (see :mod:`streams.kafka_io` for the commit discipline).
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import Counter

from streams.kafka_io import KafkaConfig

log = logging.getLogger(__name__)

PRODUCE_ERRORS = Counter("hw_stream_produce_errors", "sends refused or not delivered within the "
                         "producer's bound", ["topic", "reason"])


class MessageTooLargeError(ValueError):
    """A message over ``max_message_bytes``, refused before it was sent (nothing was queued)."""


class ProducerBoundError(KafkaError):
    """A send could not be delivered within the producer's bound: the buffer stayed full past
    ``max_block_ms`` or the broker did not acknowledge within ``delivery_timeout_ms``."""


class BatchProducer:
    """A KafkaProducer tuned for throughput, whose :meth:`flush` proves every send landed.

    Broker outages are bridged inside a bound: sends buffer (at most ``buffer_memory`` bytes not
    yet acknowledged; kafka-python 3 has no such limit of its own, so this wrapper keeps it) and
    retry until ``delivery_timeout_ms``; ``send`` blocks at most ``max_block_ms`` on a full
    buffer. Past the
    bound nothing is dropped silently: the failure is raised by the next :meth:`send` or
    :meth:`flush` (a producer that never flushes, like the generator, still learns of it), and
    counted in ``hw_stream_produce_errors_total``. A message over ``max_message_bytes`` is
    refused up front with :class:`MessageTooLargeError` naming its topic and size.
    """

    _PRUNE_EVERY = 10_000  # pending futures kept between flushes before done ones are dropped

    def __init__(self, cfg: KafkaConfig, client_id: str = "hw-producer") -> None:
        compression = None if cfg.compression in ("", "none") else cfg.compression
        self.max_message_bytes = cfg.max_message_bytes
        self.cfg = cfg
        self._producer = KafkaProducer(
            bootstrap_servers=cfg.bootstrap_servers, client_id=client_id, acks="all",
            compression_type=compression, linger_ms=cfg.linger_ms, batch_size=cfg.batch_bytes,
            # Headroom for record framing: our own size check below is the one that refuses.
            max_request_size=cfg.max_message_bytes + 4096, retries=cfg.retries,
            delivery_timeout_ms=cfg.delivery_timeout_ms, max_block_ms=cfg.max_block_ms,
            # kafka-python requires delivery >= linger + request timeout.
            request_timeout_ms=min(30_000, max(1, cfg.delivery_timeout_ms - cfg.linger_ms)),
            enable_idempotence=cfg.idempotence,
            # Back within a second of the broker's return (kafka-python backs off up to 30 s).
            reconnect_backoff_max_ms=1000,
            # Retries must not reorder a partition's messages.
            max_in_flight_requests_per_connection=1)
        self._pending: list = []
        self._error: BaseException | None = None
        self._unacked_bytes = 0
        self._acked = threading.Condition()
        self.sent = 0

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             partition: int | None = None) -> None:
        """Queues one message; raises at once if it is too large or an earlier send failed."""
        size = len(value) + (len(key) if key else 0)
        if size > self.max_message_bytes:
            PRODUCE_ERRORS.labels(topic, "too_large").inc()
            raise MessageTooLargeError(
                f"message for topic {topic} is {size} bytes, over the {self.max_message_bytes}-byte "
                f"limit (max_message_bytes, the broker's message.max.bytes); split it")
        self._raise_failed()
        with self._acked:
            room = self._acked.wait_for(
                lambda: self._unacked_bytes == 0 or
                self._unacked_bytes + size <= self.cfg.buffer_memory, self.cfg.max_block_ms / 1000)
            if not room:
                PRODUCE_ERRORS.labels(topic, "buffer_full").inc()
                raise ProducerBoundError(
                    f"send to {topic} blocked {self.cfg.max_block_ms} ms: {self._unacked_bytes} "
                    f"bytes unacknowledged, buffer_memory={self.cfg.buffer_memory} "
                    f"(broker unreachable?)")
            self._unacked_bytes += size
        try:
            fut = self._producer.send(topic, value=value, key=key, partition=partition)
        except KafkaTimeoutError as exc:  # no metadata for the topic within max_block_ms
            self._release(size)
            PRODUCE_ERRORS.labels(topic, "metadata_timeout").inc()
            raise ProducerBoundError(f"send to {topic} found no broker within "
                                     f"max_block_ms={self.cfg.max_block_ms}: {exc}") from exc
        fut.add_callback(self._on_success, size)
        fut.add_errback(self._on_failure, topic, size)
        self._pending.append(fut)
        self.sent += 1
        if len(self._pending) >= self._PRUNE_EVERY:
            self._pending = [f for f in self._pending if not f.is_done]

    def send_to_every_partition(self, topic: str, value: bytes) -> None:
        """One copy per partition of ``topic`` (a watermark promises something of each)."""
        parts = self._producer.partitions_for(topic) or {0}
        for p in sorted(parts):
            self.send(topic, value, partition=p)

    def _release(self, size: int) -> None:
        with self._acked:
            self._unacked_bytes -= size
            self._acked.notify_all()

    def _on_success(self, size: int, _metadata: object) -> None:
        self._release(size)

    def _on_failure(self, topic: str, size: int, exc: BaseException) -> None:
        self._release(size)
        PRODUCE_ERRORS.labels(topic, type(exc).__name__).inc()
        log.error("send to %s not delivered within the producer bound: %s", topic, exc)
        if self._error is None:
            self._error = ProducerBoundError(
                f"a send to {topic} was not acknowledged within delivery_timeout_ms="
                f"{self.cfg.delivery_timeout_ms}: {exc!r}")

    def _raise_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self, timeout_s: float | None = 60.0) -> None:
        """Blocks until every message sent so far is acknowledged; raises the first failure."""
        self._producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        self._raise_failed()
        for fut in pending:
            if not fut.is_done:
                raise KafkaError("send not acknowledged before flush timeout")
            if fut.failed():
                raise fut.exception

    def close(self) -> None:
        self._producer.close(timeout=10)
