"""The online joiner: impressions + actions -> labelled training examples on ``hw.examples``.

Each impression request waits in RocksDB until the event-time watermark passes its
``event_time + window``; actions for it are stored beside it as they arrive. When the window
closes every shown item becomes one example: label 1 if a positive action joined it, else a
negative, kept with probability ``negative_rate`` (recorded per example as ``sample_rate``).

Watermark (:mod:`streams.join_watermark`): the later of ``max impression event time -
allowed_lateness`` and the producers' :class:`~streams.events.Watermark` messages, held back by
every input partition that may still deliver, so actions lagging behind impressions, or left
unread by a crash, do not turn late; it never moves back. An action whose request is no longer
pending and whose time is behind the watermark is *late*: counted and routed to ``hw.late`` with
its reason. An action whose impression has not arrived yet is parked until the watermark passes
it, then joins the request that came meanwhile or is late too (``no_impression``). The idle
close (``idle_close_s``) needs the broker to confirm every input quiet that long.

One step = poll -> ingest (write new state) -> close due windows -> produce and flush examples,
DLQ and late -> delete closed state -> hand-off record (:mod:`streams.join_handoff`) -> commit
input offsets. ``--emit early`` (:mod:`streams.join_early`) sends each impression's items as
negatives after a short hold and each later positive as a positive copy at once, for the
trainer's delayed-feedback correction; the window then only bounds which clicks still count.

Scaling out and restarts (:mod:`streams.join_positions`): the input topics are the state's
changelog. Joiners of one consumer group share the input partitions; each commits, per
partition, the oldest record still pending; on every assignment change a joiner drops its state
and reads its partitions again from there, so kill -9 of one loses nothing, and what it had
already emitted comes again with the same ``example_id`` (the trainer drops those). Late actions
are not repeated: a hand-off record per partition (:mod:`streams.join_handoff`) tells the new
owner which re-read actions the old one had resolved (counted as ``replayed_resolved``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import msgpack
from kafka.errors import CommitFailedError

from streams import metrics
from streams.events import (Action, DeadLetter, Impression, SchemaError, Watermark,
                            decode_event, encode_actions, encode_chunks, encode_dead_letter)
from streams.join_build import ClosedRequest, build_examples, check_input
from streams.join_early import EarlyEmitter
from streams.join_handoff import HandOff
from streams.join_positions import PendingOffsets
from streams.join_state import (JoinState, PendingAction, action_key, parse_action,
                                request_id_of, split_impression)
from streams.join_watermark import JoinWatermark
from streams.kafka_consumer import GroupConsumer, Record
from streams.joiner_config import JoinerConfig
from streams.kafka_io import topic_names
from streams.kafka_producer import BatchProducer

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one :meth:`OnlineJoiner.step` did."""

    records: int = 0
    impressions: int = 0
    actions: int = 0
    examples: int = 0
    dlq: int = 0
    late: int = 0
    closed: int = 0
    replayed_resolved: int = 0  # re-read actions the previous owner had resolved: not late again


class OnlineJoiner:
    """Joins impressions with actions into examples; see the module docstring for the protocol."""

    def __init__(self, cfg: JoinerConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.topics = topic_names(cfg.topic_prefix)
        self.window_ms = int(cfg.window_s * 1000)
        self.lateness_ms = int(cfg.allowed_lateness_s * 1000)
        self.positive = frozenset(k.strip() for k in cfg.positive_kinds.split(",") if k.strip())
        self.state = JoinState(cfg.state_dir)
        kafka = cfg.kafka()
        self.producer = BatchProducer(kafka, client_id="hw-joiner")
        self.consumer = GroupConsumer(kafka, [self.topics.impressions, self.topics.actions],
                                      group_id=cfg.group_id, client_id="hw-joiner",
                                      track_fetch_answers=True, on_revoke=self._hand_over)
        self.handoff = HandOff(kafka, self.topics.join_positions, cfg.group_id, self.producer,
                               self.topics.actions)
        self.handoff.ensure_topic()
        self.rebuilds = 0  # times the state was rebuilt from the input (start and rebalances)
        self.replayed_resolved = 0
        self._clean = True  # every step so far ended with its output flushed
        self._generation = 0  # the consumer assignment the state was built for
        self._reset()
        self._last_input = time.monotonic()  # or the last time the input was not read to its end
        self._pending_refreshed = self._last_input

    def _reset(self) -> None:
        """An empty state, a fresh watermark and no pending offsets (the input is read again)."""
        self.state.clear()
        self.clock = JoinWatermark((self.topics.impressions, self.topics.actions), self.lateness_ms,
                                   self.cfg.idle_topic_s)
        self.positions = PendingOffsets()
        self._resolved_ms = 0  # every parked action expiring by then has left with durable output
        self._committed: dict[tuple[str, int], int] = {}
        self.early = (EarlyEmitter(self.state, self.window_ms, int(self.cfg.early_hold_s * 1000),
                                   self.positive, self.cfg.negative_rate, self.cfg.dense_dim,
                                   self.cfg.max_close_per_step) if self.cfg.emit == "early" else None)
        metrics.PENDING.set(0)

    def _rebuild(self) -> None:
        """The assignment changed: drop the state and read every owned partition again from its
        committed offset (see the module docstring)."""
        self._reset()
        self._generation = self.consumer.generation
        self.rebuilds += 1
        owned = self.consumer.rewind_to_committed()
        self.handoff.load(owned)
        # A fresh watermark knows nothing of these partitions: none counts as idle before it
        # has been quiet for idle_topic_s (the client's view of their ends may be stale).
        self.clock.quiet_from(owned, time.monotonic())
        metrics.REBUILDS.inc()
        metrics.ASSIGNED.set(len(owned))
        log.info("joiner state rebuilt from the input (assignment %s)",
                 ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(owned.items())) or "empty")

    @property
    def watermark(self) -> int:
        return self.clock.watermark

    @property
    def max_time(self) -> int:
        """The newest impression event time read."""
        return self.clock.max_time

    # ------------------------------------------------------------ one step
    def step(self, timeout_ms: int = 100) -> StepStats:
        records = self.consumer.poll(timeout_ms, self.cfg.poll_max_records)
        if self.consumer.generation != self._generation:
            self._rebuild()  # what this poll returned is read again from the committed offsets
            return StepStats()
        stats = StepStats(records=len(records))
        self._clean = False
        now = time.monotonic()
        if records or not self.clock.read_to_end(self.consumer.assignment(),
                                                 self.consumer.partitions_behind()):
            # Not idle: a joiner still joining its group, or with unread input, is not quiet.
            self._last_input = now
        elif self.cfg.idle_close_s and self.clock.answered_since(
                self.consumer.assignment(), self.consumer.fetch_answered(), self._last_input + self.cfg.idle_close_s):
            # A quiet stream: close everything instead of holding it until traffic returns.
            self.clock.advance_to(self.max_time + self.window_ms)
        self._ingest(records, stats)
        self._close_due(stats)
        assigned = self.consumer.assignment()
        self.handoff.publish(self.positions.read_ends(assigned), self._resolved_ms,
                             self.state.parked_sources)
        self._clean = True
        restart = self.positions.restart_offsets(assigned)
        moved = {tp: o for tp, o in restart.items() if self._committed.get(tp) != o}
        try:
            self.consumer.commit(moved)
            self._committed.update(moved)
        except CommitFailedError as exc:  # partitions moved in a rebalance: input is replayed
            log.warning("offset commit failed (%s); those records will be read again", exc)
        metrics.WATERMARK.set(self.watermark)
        if now - self._pending_refreshed > 1.0:  # a key scan: refreshed about once a second
            self._pending_refreshed = now
            metrics.PENDING.set(self.state.count_pending())
        return stats

    def _ingest(self, records: list[Record], stats: StepStats) -> None:
        wb = self.state.batch()
        impressions: list[tuple[Record, Impression]] = []
        actions: list[tuple[Record, Action]] = []
        dead: list[DeadLetter] = []
        now = time.monotonic()
        for rec in records:
            source = (rec.topic, rec.partition)
            self.clock.delivered(source, now)
            self.positions.read(source, rec.offset)
            try:
                event = decode_event(rec.value)
                check_input(event, rec.topic, self.topics, self.cfg.dense_dim)
            except SchemaError as exc:
                dead.append(DeadLetter(str(exc), rec.topic, rec.partition, rec.offset, rec.value))
                continue
            if isinstance(event, Impression):
                impressions.append((rec, event))
                self.clock.impression(source, event.event_time_ms)
                stats.impressions += len(event.items)
            elif isinstance(event, Watermark):
                self.clock.promise(source, event.event_time_ms)
            else:
                actions.extend((rec, a) for a in event)
                self.clock.action(source, max(a.event_time_ms for a in event))
        new_requests = self._ingest_impressions(wb, impressions)
        stats.actions = len(actions)
        metrics.EVENTS_IN.labels("impression").inc(stats.impressions)
        metrics.EVENTS_IN.labels("action").inc(stats.actions)
        late = self._ingest_actions(wb, actions, new_requests)
        self.clock.update(self.consumer.assignment(), self.consumer.partitions_behind(),
                          self.consumer.fetch_answered())
        # Adding state before the output is safe: a replay re-adds the same keys.
        self.state.write(wb)
        self._send_dead(dead, late, stats)

    def _ingest_impressions(self, wb, impressions: list[tuple[Record, Impression]]) -> set[bytes]:
        """Stores each impression as a pending request; an exact repeat (a producer retry)
        replaces the one stored, whose record then no longer needs replaying."""
        stored: dict[bytes, tuple[str, int, int]] = {}
        keys = []
        held: dict[tuple[str, int], list[int]] = {}
        replaced: list = []
        for rec, event in impressions:
            rid = event.request_id.encode()
            key = self.state.put_impression(wb, rid, event.event_time_ms + self.window_ms,
                                            rec.value, (rec.partition, rec.offset))
            if self.early is not None:
                self.early.hold(wb, rid, event.event_time_ms)
            held.setdefault((rec.topic, rec.partition), []).append(rec.offset)
            if key in stored:  # released once the holds are in
                replaced.append(stored[key][1:])
            stored[key] = (rec.topic, rec.partition, rec.offset)
            keys.append(key)
        for tp, offsets in held.items():
            self.positions.hold(tp, offsets)
        for source in replaced:
            self.positions.release_sources([(self.topics.impressions, source)])
        for key, before in zip(keys, self.state.get_many(keys)):
            if before is not None and stored.pop(key, None) is not None:
                self.positions.release_sources(
                    [(self.topics.impressions, split_impression(before)[1])])
        return {event.request_id.encode() for _, event in impressions}

    def _ingest_actions(self, wb, actions: list[tuple[Record, Action]],
                        new_requests: set[bytes]) -> list[tuple[Record, Action, str]]:
        rids = [a.request_id.encode() for _, a in actions]
        states = self.state.request_states(rids)
        late = []
        stored: dict[bytes, PendingAction] = {}  # a-key -> the action stored this step
        held: dict[tuple[str, int], list[int]] = {}
        replaced: list = []
        for (rec, a), rid, state in zip(actions, rids, states):
            pa = PendingAction(a.item_id, a.kind, a.value, a.event_time_ms, a.user_id,
                               (rec.partition, rec.offset))
            if self.early is not None and rid not in new_requests and self.early.takes(
                    rid, state, pa):
                continue  # its positive copy leaves this step
            if state is None and rid not in new_requests and a.event_time_ms < self.watermark:
                late.append((rec, a, "closed"))
                continue
            key = action_key(rid, a.item_id, a.kind)
            # Pending (or its impression in this very step): stored beside it; else parked
            # until the watermark passes it, its impression may still come.
            orphan = None if state is not None or rid in new_requests else (
                a.event_time_ms + self.window_ms)
            self.state.put_action(wb, key, pa, orphan_expire_ms=orphan)
            held.setdefault((rec.topic, rec.partition), []).append(rec.offset)
            earlier = stored.pop(key, None)
            if earlier is not None:  # the same action twice in one step: one is kept
                replaced.append(earlier.source)
            stored[key] = pa
        for tp, offsets in held.items():
            self.positions.hold(tp, offsets)
        for source in replaced:
            self.positions.release_sources([(self.topics.actions, source)])
        keys = list(stored)
        for key, before in zip(keys, self.state.get_many(keys)):
            if before is not None:  # an action stored before is replaced
                self.positions.release_sources(
                    [(self.topics.actions, parse_action(key, before).source)])
        return late

    def _close_due(self, stats: StepStats) -> None:
        due = self.state.due_impressions(self.watermark, self.cfg.max_close_per_step)
        rids = [key[9:] for key, _, _ in due]
        stored = self.state.actions_of(rids)
        released: list = []
        if self.early is None:
            closed = [ClosedRequest(msgpack.unpackb(msg, raw=False),
                                    [pa for _, pa in acts]) for (_, msg, _), acts in zip(due, stored)]
            batch, unjoined, dropped = build_examples(closed, self.window_ms, self.positive,
                                                      self.cfg.negative_rate, self.cfg.dense_dim)
        else:  # the examples left at the hold; window close only ends the request
            early = self.early.step(self.clock.read_through, rids)
            batch, unjoined, dropped, released = (early.batch, early.unjoined, early.dropped,
                                                  early.released)
        orphans = list(self.state.expired_orphans(self.watermark, self.cfg.max_close_per_step))
        orphan_values = self.state.get_many([a for _, a in orphans])
        # A parked action whose impression came meanwhile belongs to that request (closing now
        # or soon, up to max_close_per_step a step): it is joined there, not late.
        claimed = self.state.pending_requests([request_id_of(a).encode() for _, a in orphans])
        for payload in encode_chunks(batch, self.cfg.examples_per_message,
                                     self.producer.max_message_bytes):
            self.producer.send(self.topics.examples, payload)
        late = [(u.request_id, u.action, u.reason) for u in unjoined]
        done: list = []  # the sources whose events leave the state with this step's output
        resolved = 0  # re-read actions that the previous owner had resolved
        for (_, akey), value, is_claimed in zip(orphans, orphan_values, claimed):
            # value None: a request that closed earlier consumed it.
            if value is not None and not is_claimed:
                pa = parse_action(akey, value)
                done.append((self.topics.actions, pa.source))
                if pa.source is not None and self.handoff.covers(
                        (self.topics.actions, pa.source[0]), pa.source[1],
                        pa.event_time_ms + self.window_ms):
                    resolved += 1
                else:
                    late.append((request_id_of(akey), pa, "no_impression"))
        for rid, pa, reason in late:
            self._send_late(rid, pa, reason)
        self.producer.flush()  # output durable before state is deleted and offsets committed
        if len(orphans) < self.cfg.max_close_per_step:  # every parked action due is resolved
            self._resolved_ms = self.watermark
        wb = self.state.batch()
        if self.early is not None:
            self.early.commit(wb, released)
        for (key, _, source), acts in zip(due, stored):
            self.state.delete_request(wb, key, [k for k, _ in acts])
            done.append((self.topics.impressions, source))
            done.extend((self.topics.actions, pa.source) for _, pa in acts)
        for (okey, akey), is_claimed in zip(orphans, claimed):
            wb.delete(okey)
            if not is_claimed:  # a claimed one goes with its request
                wb.delete(akey)
        self.state.write(wb)
        self.positions.release_sources(done)
        positives = int(batch.label.sum()) if len(batch) else 0
        metrics.EXAMPLES_OUT.labels("1").inc(positives)
        metrics.EXAMPLES_OUT.labels("0").inc(len(batch) - positives)
        metrics.NEGATIVES_DROPPED.inc(dropped)
        stats.examples += len(batch)
        stats.closed = len(due)
        stats.late += len(late)
        stats.replayed_resolved = resolved
        self.replayed_resolved += resolved
        metrics.REPLAYED_RESOLVED.inc(resolved)

    def _send_late(self, request_id: str, pa: PendingAction, reason: str) -> None:
        action = Action(request_id, pa.user_id, pa.item_id, pa.kind, pa.value, pa.event_time_ms)
        self.producer.send(self.topics.late, encode_dead_letter(DeadLetter(
            reason, self.topics.actions, -1, -1, encode_actions([action]))))
        metrics.LATE.labels(reason).inc()

    def _send_dead(self, dead: list[DeadLetter], late: list[tuple[Record, Action, str]],
                   stats: StepStats) -> None:
        for d in dead:
            log.warning("dlq: %s (%s[%d]@%d)", d.reason, d.topic, d.partition, d.offset)
            self.producer.send(self.topics.dlq, encode_dead_letter(d))
            metrics.DLQ.labels(metrics.dlq_reason(d.reason)).inc()
        for rec, a, reason in late:
            self.producer.send(self.topics.late, encode_dead_letter(DeadLetter(
                reason, rec.topic, rec.partition, rec.offset, encode_actions([a]))))
            metrics.LATE.labels(reason).inc()
        stats.dlq += len(dead)
        stats.late += len(late)

    def pause(self) -> None:
        """Stops reading (membership kept; see :meth:`GroupConsumer.pause`)."""
        self.consumer.pause()

    def resume(self) -> None:
        """Reads again; the resumed partitions hold the watermark until they have been quiet
        for ``idle_topic_s``: what was read of their ends before the pause is stale."""
        self.consumer.resume()
        self.clock.quiet_from(self.consumer.assignment(), time.monotonic())

    # ------------------------------------------------------------ lifecycle
    def run(self, stop: threading.Event, on_step=None) -> None:
        """Steps until ``stop`` is set, then closes cleanly (state and consumer)."""
        try:
            while not stop.is_set():
                stats = self.step()
                if on_step is not None:
                    on_step(stats)
        finally:
            self.close()

    def _hand_over(self, partitions: set[tuple[str, int]]) -> None:
        """Partitions leave (a rebalance, or close): the last record, exact if the output so far
        is flushed (between steps), else left to the throttled ones."""
        if self._clean:
            self.handoff.hand_over(self.positions.read_ends(partitions), self._resolved_ms,
                                   self.state.parked_sources)

    def close(self) -> None:
        self._hand_over(self.consumer.assignment())
        for closer in (self.consumer.close, self.producer.close, self.state.close):
            try:
                closer()
            except Exception:  # closing must release the rest even if one part is broken
                log.exception("error while closing the joiner")

