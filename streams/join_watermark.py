"""The joiner's event-time watermark: how far every input partition has been read.

Flink's rule for a source read as several splits: the combined watermark is the minimum over the
splits, a split that has not produced anything yet holds it back (it may hold the oldest events
of all), and a split stops holding it once it is idle. Here a split is one partition of
``hw.impressions`` or ``hw.actions``; its *progress* is the newest event time read from it minus
the allowed lateness (a :class:`~streams.events.Watermark` message on it moves it too).

The watermark is the later of ``max impression time - allowed lateness`` and the smaller of the
producers' explicit watermarks on the two topics, held back to the progress of every assigned
input partition that may still deliver older events:

- one with unread messages, or whose end is not known yet (no fetch answered);
- one that has not been quiet for ``idle_s`` *as the broker saw it*: the newest fetch answer
  applied for it must have been sent at least ``idle_s`` after its last message (or after
  :meth:`JoinWatermark.quiet_from`). The client's view of a partition's end is only as fresh as
  that answer (:mod:`streams.fetch_answers`); wall time alone is not enough, since a loaded
  process can go seconds without applying any answer while the partition fills up.

An assigned partition read to its end and quiet for ``idle_s`` by that rule is idle and holds
nothing. :attr:`JoinWatermark.read_through` is the same minimum without the lateness: the event
time up to which every input has been read (early emission ends an impression's hold there, so
that its negatives never run ahead of the clicks still unread on a lagging actions topic). While
the consumer owns no partition of an input topic, nothing is known about what that topic still
holds, and the watermark does not move: at start-up, before the group is joined (seconds on
Tansu; after a kill -9, until the dead member's session has expired), and during a rebalance. It
never moves back. A joiner whose partitions move starts a fresh one along with a fresh state: both
are rebuilt by reading the input again (:mod:`streams.joiner`).
"""

from __future__ import annotations

Partition = tuple[str, int]


class JoinWatermark:
    """Event-time progress of the joiner's input partitions, and the watermark it allows."""

    def __init__(self, inputs: tuple[str, ...], lateness_ms: int, idle_s: float) -> None:
        self.inputs = inputs
        self.lateness_ms = lateness_ms
        self.idle_s = idle_s
        self.watermark = 0
        self.max_time = 0  # newest impression event time
        self.read_through = 0  # every input read up to here (no lateness): see the module doc
        self._progress: dict[Partition, int] = {}
        self._newest: dict[Partition, int] = {}  # newest event time read, per partition
        # Explicit Watermark messages, per input topic: a promise on one topic says nothing
        # about the other, so the smaller of the two counts.
        self._explicit = {t: 0 for t in inputs}
        self._delivered: dict[Partition, float] = {}  # monotonic time of the last message

    # ---- what was read
    def delivered(self, partition: Partition, now: float) -> None:
        """A message (of any kind, valid or not) came from ``partition``."""
        self._delivered[partition] = now

    def quiet_from(self, partitions, now: float) -> None:
        """``partitions`` count as delivering at ``now`` (fetching resumes): none is taken for
        idle before ``idle_s`` of quiet, whatever a stale end from before said."""
        for tp in partitions:
            self._delivered[tp] = now

    def impression(self, partition: Partition, event_time_ms: int) -> None:
        self.max_time = max(self.max_time, event_time_ms)
        self._advance(partition, event_time_ms, event_time_ms - self.lateness_ms)

    def action(self, partition: Partition, event_time_ms: int) -> None:
        self._advance(partition, event_time_ms, event_time_ms - self.lateness_ms)

    def promise(self, partition: Partition, event_time_ms: int) -> None:
        """A producer's Watermark message: nothing older will come on this topic."""
        topic = partition[0]
        self._explicit[topic] = max(self._explicit.get(topic, 0), event_time_ms)
        self._advance(partition, event_time_ms, event_time_ms)

    def _advance(self, partition: Partition, newest: int, progress: int) -> None:
        self._newest[partition] = max(newest, self._newest.get(partition, newest))
        self._progress[partition] = max(progress, self._progress.get(partition, progress))

    # ---- what may close
    def read_to_end(self, assigned: set[Partition], behind: set[Partition]) -> bool:
        """Whether the consumer owns a partition of every input and none has unread messages."""
        return not behind and self._owns_every_input(assigned)

    def _owns_every_input(self, assigned: set[Partition]) -> bool:
        owned = {t for t, _ in assigned}
        return all(t in owned for t in self.inputs)

    def update(self, assigned: set[Partition], behind: set[Partition],
               answered: dict[Partition, float]) -> int:
        """Moves the watermark as far as the inputs allow (never back); returns it.

        ``answered``: per partition, the monotonic send time of the newest fetch answer the
        consumer applied (:meth:`~streams.kafka_consumer.GroupConsumer.fetch_answered`)."""
        if not self._owns_every_input(assigned):
            return self.watermark
        candidate = max(self.max_time - self.lateness_ms, min(self._explicit.values()))
        through = max(self.max_time, min(self._explicit.values()))
        never = float("-inf")
        for tp in assigned:
            if tp in behind or answered.get(tp, never) - self._delivered.get(tp, never) < self.idle_s:
                candidate = min(candidate, self._progress.get(tp, 0))
                through = min(through, self._newest.get(tp, 0))
        self.watermark = max(self.watermark, candidate)
        self.read_through = max(self.read_through, through, self.watermark)
        return self.watermark

    @staticmethod
    def answered_since(assigned: set[Partition], answered: dict[Partition, float], since: float) -> bool:
        """Whether every assigned partition's end was confirmed by a fetch sent at or after
        ``since`` (the client's view of an end is only as fresh as its last applied answer)."""
        return all(answered.get(tp, float("-inf")) >= since for tp in assigned)

    def advance_to(self, t: int) -> None:
        """Closes up to ``t`` whatever the inputs hold (the joiner's idle close)."""
        self.watermark = max(self.watermark, t)
        self.read_through = max(self.read_through, t)
