"""Each user's recent interactions, live from the action stream, for the rerank prompt.

Bounded in memory: at most ``max_users`` users (the least recently active go first) and
``per_user`` interactions each (the oldest go first). An interaction older than ``ttl_s`` before
the newest event time seen is no longer returned; time is the stream's event time, so a replayed
log ages its history as it happened, not by the wall clock.

Every interaction gets an absolute position in its user's history (0 for the first ever seen).
The rerank prompt uses it to move the window of rendered history in whole chunks, so a new
interaction appends to the previous prompt instead of shifting it (see :mod:`serving.rerank`).

:class:`HistoryFollower` keeps it fed from ``hw.actions`` (a :class:`streams.topic_follower.TopicFollower`
starting ``ttl_s`` back), so serving's history lags the stream by one poll (~50 ms), well inside
the freshness target.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from serving import metrics as m

log = logging.getLogger(__name__)

__all__ = ["HistoryConfig", "Interaction", "UserHistory", "HistoryFollower"]


@dataclass
class HistoryConfig:
    """How much live history serving keeps."""

    history: bool = field(default=True, metadata={"help": "follow hw.actions into a live per-user history (the rerank prompt's context)"})
    history_users: int = field(default=1_000_000, metadata={"help": "users whose history is kept; beyond, the least recently active go"})
    history_per_user: int = field(default=64, metadata={"help": "interactions kept per user (the rerank shows the newest of them)"})
    history_ttl_s: float = field(default=30 * 86400.0, metadata={"help": "interactions older than this (event time) are forgotten"})


@dataclass(frozen=True, slots=True)
class Interaction:
    item_id: int
    kind: str
    time_ms: int


class _Track:
    __slots__ = ("items", "total")

    def __init__(self, per_user: int) -> None:
        self.items: deque[Interaction] = deque(maxlen=per_user)
        self.total = 0  # interactions ever appended: the absolute position of the next one


class UserHistory:
    """user id -> recent interactions (oldest first); thread-safe."""

    def __init__(self, max_users: int = 1_000_000, per_user: int = 64, ttl_s: float = 30 * 86400.0) -> None:
        if max_users <= 0 or per_user <= 0 or ttl_s <= 0:
            raise ValueError("max_users, per_user and ttl_s must be positive")
        self.max_users, self.per_user, self.ttl_ms = max_users, per_user, int(ttl_s * 1000)
        self._users: OrderedDict[int, _Track] = OrderedDict()
        self._lock = threading.Lock()
        self.now_ms = 0  # the newest event time seen
        self.applied = 0

    def __len__(self) -> int:
        return len(self._users)

    def add(self, user_id: int, item_id: int, kind: str = "click", time_ms: int = 0) -> None:
        self.extend([(user_id, Interaction(item_id, kind, time_ms))])

    def extend(self, events: list[tuple[int, Interaction]]) -> None:
        with self._lock:
            for user_id, it in events:
                track = self._users.get(user_id)
                if track is None:
                    track = self._users[user_id] = _Track(self.per_user)
                    while len(self._users) > self.max_users:
                        self._users.popitem(last=False)
                else:
                    self._users.move_to_end(user_id)
                track.items.append(it)
                track.total += 1
                self.now_ms = max(self.now_ms, it.time_ms)
            self.applied += len(events)
            m.HISTORY_USERS.set(len(self._users))
        m.HISTORY_EVENTS.inc(len(events))

    def recent(self, user_id: int) -> tuple[list[Interaction], int]:
        """``(interactions oldest first, absolute position of the first)``, within the TTL."""
        with self._lock:
            track = self._users.get(user_id)
            if track is None:
                return [], 0
            items = list(track.items)
            first = track.total - len(items)
            horizon = self.now_ms - self.ttl_ms
        drop = 0
        while drop < len(items) and items[drop].time_ms < horizon:
            drop += 1
        return items[drop:], first + drop


class HistoryFollower:
    """Feeds a :class:`UserHistory` from ``hw.actions`` (``streams.events`` actions messages)."""

    def __init__(self, history: UserHistory, bootstrap_servers: str, topic: str, ttl_s: float) -> None:
        from streams.topic_follower import TopicFollower

        self.history = history
        self.bad = 0
        start = int((time.time() - ttl_s) * 1000)
        self.follower = TopicFollower(bootstrap_servers, topic, self._apply, start_at=max(start, 0),
                                      client_id="hw-user-history")

    def _apply(self, records: list) -> None:
        from streams.events import SchemaError, decode_event

        events = []
        for r in records:
            try:
                ev = decode_event(r.value)
            except (SchemaError, ValueError):
                self.bad += 1
                continue
            if isinstance(ev, list):
                events.extend((a.user_id, Interaction(a.item_id, a.kind, a.event_time_ms)) for a in ev)
        if events:
            self.history.extend(events)

    @property
    def caught_up(self) -> bool:
        return self.follower.caught_up

    @property
    def error(self) -> BaseException | None:
        return self.follower.error

    def wait_caught_up(self, timeout_s: float) -> bool:
        return self.follower.wait_caught_up(timeout_s)

    def start(self) -> "HistoryFollower":
        self.follower.start()
        return self

    def stop(self) -> None:
        self.follower.stop()
