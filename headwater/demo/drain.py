"""When a replayed log has gone all the way through the pipeline (``headwater demo --dataset``).

A replay is finite: its process exits 0 once every row is sent, the last message on each input
topic being a final watermark that closes every join window. The demo is done when the joiner
has turned all of that into examples and the trainer has trained on all of those. Both facts
are read where the stages record them, in Kafka: a stage commits its input offsets only once
its output and state are durable (the joiner after its examples are acknowledged, the trainer
after the checkpoint that covers them), so a group's committed offsets at a topic's end mean
"all of it, durably", whatever restarts happened on the way. Counters in ``/metrics`` restart
from zero with their process, so they are not used to decide.

Two details the offsets alone do not settle:

* the joiner closes at most ``max_close_per_step`` requests per step, so after its last input
  commit it may still be emitting; it is settled once its pending-requests gauge reads 0 and
  the end of ``hw.examples`` has not moved for ``settle_s`` (the gauge refreshes every second);
* Tansu answers ListOffsets(latest) with the base offset of the partition's last record batch
  plus one, which is short of the end when that batch holds several records, so ends are read
  with :func:`streams.kafka_consumer.log_end` (a fetch's high watermark).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from streams.kafka_consumer import log_end

log = logging.getLogger(__name__)

__all__ = ["DrainWatch", "log_end"]  # log_end: re-exported from streams.kafka_consumer


def _committed(consumer: KafkaConsumer, topic: str, partitions: list[int]) -> dict[int, int]:
    out = {}
    for p in partitions:
        off = consumer.committed(TopicPartition(topic, p))
        out[p] = int(off) if off is not None else 0
    return out


def _covers(committed: dict[int, int], ends: dict[int, int]) -> bool:
    return all(committed.get(p, 0) >= end for p, end in ends.items())


@dataclass
class DrainWatch:
    """Answers "has the finished replay gone all the way through?" (see the module docstring).

    Call :meth:`drained` about once a second after the replay has exited 0, with the joiner's
    ``hw_stream_pending_requests`` gauge as last scraped (NaN when it did not answer).
    """

    bootstrap_servers: str
    impressions: str
    actions: str
    examples: str
    joiner_group: str = "hw-joiner"
    trainer_group: str = "hw-trainer"
    settle_s: float = 2.0
    _inputs_end: dict[str, dict[int, int]] | None = field(default=None, init=False, repr=False)
    _examples_end: dict[int, int] | None = field(default=None, init=False, repr=False)
    _settled_since: float | None = field(default=None, init=False, repr=False)
    _consumers: dict[str | None, KafkaConsumer] = field(default_factory=dict, init=False, repr=False)

    def _consumer(self, group: str | None) -> KafkaConsumer:
        if group not in self._consumers:
            # A group id is needed to read that group's committed offsets; this consumer never
            # subscribes, so it never joins (or disturbs) the group.
            self._consumers[group] = KafkaConsumer(
                bootstrap_servers=self.bootstrap_servers, group_id=group, enable_auto_commit=False,
                client_id="hw-demo-drain")
        return self._consumers[group]

    def drained(self, joiner_pending: float, now: float | None = None) -> bool:
        try:
            return self._drained(joiner_pending, time.monotonic() if now is None else now)
        except (KafkaError, TimeoutError) as exc:  # the broker is busy: ask again next time
            log.debug("drain check failed: %s", exc)
            return False

    def _drained(self, joiner_pending: float, now: float) -> bool:
        offsets = self._consumer(None)
        if self._inputs_end is None:  # the replay has ended: the inputs' ends are final
            self._inputs_end = {t: log_end(offsets, t) for t in (self.impressions, self.actions)}
            log.info("replay finished; input ends %s", self._inputs_end)
        joiner = self._consumer(self.joiner_group)
        if not all(_covers(_committed(joiner, t, list(ends)), ends)
                   for t, ends in self._inputs_end.items()):
            self._settled_since = None
            return False
        examples_end = log_end(offsets, self.examples)
        if math.isnan(joiner_pending) or joiner_pending > 0 or examples_end != self._examples_end:
            self._examples_end, self._settled_since = examples_end, None
            return False
        if self._settled_since is None:
            self._settled_since = now
        if now - self._settled_since < self.settle_s:
            return False
        trainer = self._consumer(self.trainer_group)
        done = _covers(_committed(trainer, self.examples, list(examples_end)), examples_end)
        if done:
            log.info("joiner and trainer drained: %s ends %s", self.examples, examples_end)
        return done

    def close(self) -> None:
        for c in self._consumers.values():
            c.close(autocommit=False)
        self._consumers.clear()
