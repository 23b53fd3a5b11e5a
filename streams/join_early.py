"""Early emission for the joiner (``headwater join --emit early``): a click reaches the trainer in
seconds instead of after the join window.

An impression is held for ``early_hold_s`` of event time, then every shown item leaves as a
negative (the hold ends when every input has been read past it, :attr:`~streams.join_watermark.JoinWatermark.read_through`:
a negative may always leave early, the trainer's correction expects it, but never ahead of a
lagging actions topic: on a backlog, negatives keyed to the newest impression read ran tens of
seconds of event time ahead of their clicks, and the trainer, whose label wait counts from the
newest row, took those impressions for final negatives). A positive action within
the window emits a positive copy at once: at the hold if it came before, else in the step that
reads it. So every positive appears once as a negative and once as a positive, the stream that
fake-negative weighting corrects (:mod:`training.delayed_feedback`). The request stays pending
until its window closes, so later clicks still find it and late ones are still routed to
``hw.late``; at window close nothing more is emitted.

Crash safety is the joiner's: output is flushed before the hold's end is recorded and before
offsets move past it; a replay re-emits the same example ids (the negative's, and the positive copy's
from :func:`~streams.join_build.positive_copy_ids`), which the trainer's de-dup drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from streams.events import ExampleBatch
from streams.join_build import ClosedRequest, Unjoined, build_early
from streams.join_state import JoinState, PendingAction, split_impression


@dataclass
class EarlyStep:
    """What one step of early emission produced, and the holds it ends once output is durable."""

    batch: ExampleBatch
    unjoined: list[Unjoined]
    dropped: int
    released: list[tuple[bytes, bytes]] = field(default_factory=list)  # (request id, r-value)


class EarlyEmitter:
    """The early-emission part of :class:`~streams.joiner.OnlineJoiner`'s step."""

    def __init__(self, state: JoinState, window_ms: int, hold_ms: int, positive: frozenset[str],
                 negative_rate: float, dense_dim: int, limit: int) -> None:
        self.state, self.window_ms, self.hold_ms = state, window_ms, hold_ms
        self.positive, self.negative_rate, self.dense_dim = positive, negative_rate, dense_dim
        self.limit = limit
        self.arrivals: list[tuple[bytes, bytes, PendingAction]] = []  # this step's late positives

    def hold(self, wb, request_id: bytes, event_time_ms: int) -> None:
        self.state.put_held(wb, request_id, event_time_ms + self.window_ms,
                            event_time_ms + self.hold_ms)

    def takes(self, request_id: bytes, r_value: bytes | None, action: PendingAction) -> bool:
        """Whether an arriving action is a positive for a request whose negatives already left:
        its copy goes out this step (nothing to store)."""
        if r_value is None or len(r_value) != 8 or action.kind not in self.positive:
            return False
        self.arrivals.append((request_id, r_value, action))
        return True

    def step(self, clock_ms: int, due_windows: list[bytes]) -> EarlyStep:
        """The examples of the holds ended by ``clock_ms`` (and of requests whose window closes
        now, should the per-step limit have left their hold open) and the arrivals' copies, in
        impression time order, each request's copies right after its negatives.

        The trainer takes an impression's label for final once its newest row is a label wait
        (window + lateness) newer. A step on a backlog spans many seconds of event time; with
        all its negatives first, a copy of its oldest impression came after negatives more
        than a wait newer, and the trainer had already scored and trained that impression as
        an unclicked one."""
        rids = self.state.due_holds(clock_ms, self.limit)
        held = set(rids)
        extra = [r for r in due_windows if r not in held]
        rids += [r for r, v in zip(extra, self.state.request_states(extra)) if v and len(v) == 16]
        states = self.state.request_states(rids)
        requests = self._requests(rids, states, [[pa for _, pa in a] for a in
                                                 self.state.actions_of(rids)])
        neg, unjoined, dropped = build_early(requests, self.window_ms, self.positive,
                                             self.negative_rate, self.dense_dim)
        arrivals, self.arrivals = self.arrivals, []
        by_request: dict[bytes, tuple[bytes, list[PendingAction]]] = {}
        for rid, value, pa in arrivals:
            by_request.setdefault(rid, (value, []))[1].append(pa)
        later = list(by_request)
        pos, late, _ = build_early(
            self._requests(later, [by_request[r][0] for r in later],
                           [by_request[r][1] for r in later]),
            self.window_ms, self.positive, self.negative_rate, self.dense_dim, negatives=False)
        if len(pos):  # two positive kinds on one item in one step: one copy
            _, first = np.unique(pos.example_id, return_index=True)
            pos = pos.take(np.sort(first))
        out = ExampleBatch.concat([neg, pos])
        if len(out):  # impression time order, a request's copies after its negatives (see below)
            out = out.take(np.lexsort((out.label, out.event_time_ms)))
        return EarlyStep(out, unjoined + late, dropped, list(zip(rids, states)))

    def _requests(self, rids: list[bytes], states: list[bytes | None],
                  actions: list[list[PendingAction]]) -> list[ClosedRequest]:
        keys = [JoinState.impression_key(r, v) for r, v in zip(rids, states) if v is not None]
        acts = [a for v, a in zip(states, actions) if v is not None]
        return [ClosedRequest(msgpack.unpackb(split_impression(m)[0], raw=False), a)
                for m, a in zip(self.state.get_many(keys), acts) if m is not None]

    def commit(self, wb, released: list[tuple[bytes, bytes]]) -> None:
        """Records the ends of holds whose negatives are durable on ``hw.examples``."""
        for rid, value in released:
            if value is not None:
                self.state.release(wb, rid, value)
