"""Pinning and rollback of a serving replica (``headwater params pin|rollback|unpin|status``).

The replica keeps its last ``history_versions`` versions (:mod:`serving.version_history`: the
towers, and the pre-images of the rows each delta changed) and acts on ``control`` messages on
its partition, which a serving process's admin endpoint (:mod:`serving.params_admin`) writes to
every partition, so every replica following the topic acts on the same command within its poll
interval:

- ``pin V``: serve version ``V`` and stop applying newer messages. ``V`` older than the served
  version is restored in place from the pre-images; newer (while pinned behind) is reached by
  reading on from the pinned version's end offset. A version the replica does not hold is
  refused (NOT_FOUND in the command's result and the log) and the replica serves as before.
- ``unpin``: read on from where the pinned version ends (or from a newer complete snapshot, if
  one was published since) and follow the newest again.

While pinned the replica keeps reading the partition (for the next command, and to know which
newer versions exist) but applies nothing. Command offsets already acted on are skipped when it
re-reads, and a warm restart re-reads from the pinned version's end, so the pin survives it.
A replica that bootstraps from a snapshot newer than the pinned version cannot serve it (it
never held it): it follows the newest version; ``status`` tells which version each serves.

Why apart from :class:`serving.param_server.ParamServer`: the pin is a small state machine (which
version is served, where newer ones end, where to read next) that decides; the server reads the
topic and applies what the pin lets through.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

from paramsync import SNAPSHOT_END, SPARSE, ControlCommand, ParamsMessage
from serving.version_history import VersionHistory

__all__ = ["CommandResult", "VersionPin"]

PINNED_VERSION = Gauge("hw_serve_pinned_version", "version serving is pinned to (-1: following the newest)",
                       multiprocess_mode="livemax")
_RESULTS_KEPT = 256  # command results the admin endpoint may still ask about


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What this replica did with one control command: ``code`` OK, NOT_FOUND or INVALID_ARGUMENT."""

    command_id: int
    action: str
    version: int
    code: str
    message: str

    @property
    def ok(self) -> bool:
        return self.code == "OK"


class VersionPin:
    """Which version a replica serves while pinned, and where it must read next.

    ``frozen_at``: messages at or past this offset are not applied (None: following the newest);
    ``seek``: the offset the follower must move its consumer to (set by a command, taken by the
    follower). Every method runs under the replica's lock.
    """

    def __init__(self, history: VersionHistory, history_versions: int) -> None:
        self.history = history
        self.history_versions = history_versions  # as configured, for the messages
        self.version: int | None = None  # the pinned version
        self.frozen_at: int | None = None
        self.seek: int | None = None
        self.later: dict[int, int] = {}  # pinned: versions newer than the served one -> end offset
        self.snapshot_later = -1  # pinned: begin offset of a complete snapshot past the pin
        self.commands_upto = -1  # offset of the newest control message acted on
        self.results: OrderedDict[int, CommandResult] = OrderedDict()

    def holds_back(self, offset: int) -> bool:
        """Whether the message at ``offset`` lies past the pin (noted, not applied)."""
        return self.frozen_at is not None and offset >= self.frozen_at

    def note_later(self, offset: int, msg: ParamsMessage) -> None:
        """Pinned: remember where each newer version ends (and newer snapshots) without applying."""
        if msg.snapshot_offset >= (self.frozen_at or 0):
            self.snapshot_later = max(self.snapshot_later, msg.snapshot_offset)
        ends_version = (msg.kind == SNAPSHOT_END if msg.in_snapshot
                        else msg.kind == SPARSE or msg.chunk_index == msg.chunk_count - 1)
        pinned = -1 if self.version is None else self.version
        if ends_version and msg.version > pinned:
            self.later[msg.version] = offset + 1

    def act(self, cmd: ControlCommand, state: Any, ready: bool, next_offset: int) -> CommandResult:
        """Carries out ``cmd`` on the replica's ``state`` (``ready``: it serves a model;
        ``next_offset``: where it reads next)."""
        code, message = self._pin(cmd.version, state, ready) if cmd.action == "pin" else self._unpin(next_offset)
        result = CommandResult(cmd.command_id, cmd.action, cmd.version, code, message)
        self.results[cmd.command_id] = result
        while len(self.results) > _RESULTS_KEPT:
            self.results.popitem(last=False)
        return result

    def _pin(self, version: int, state: Any, ready: bool) -> tuple[str, str]:
        cur = self.history.current
        if cur is None or not ready:
            return "NOT_FOUND", f"version {version} is not held: no model loaded yet"
        if version <= cur.version:
            if self.history.get(version) is None:
                return "NOT_FOUND", f"version {version} is not held ({self.held_text()})"
            target, undone = self.history.undo_to(state.table, version)
            for entry in undone:
                self.later[entry.version] = entry.next_offset
            state.tower, state.version, state.watermark_ms = target.tower, target.version, target.watermark_ms
            self.frozen_at = target.next_offset
        elif self.frozen_at is not None and version in self.later:
            # Pinned behind: read on from the served version up to the end of the one asked for.
            self.seek, self.frozen_at = cur.next_offset, self.later[version]
            self.later = {v: o for v, o in self.later.items() if v > version}
        else:
            return "NOT_FOUND", f"version {version} is not held ({self.held_text()})"
        self.version = version
        PINNED_VERSION.set(version)
        return "OK", f"pinned to version {version}"

    def _unpin(self, next_offset: int) -> tuple[str, str]:
        if self.frozen_at is None:
            return "OK", "not pinned: following the newest version"
        cur = self.history.current
        resume = cur.next_offset if cur is not None and cur.next_offset >= 0 else next_offset
        if self.snapshot_later >= resume:  # a complete snapshot since: start there
            resume = self.snapshot_later
        self.seek, self.frozen_at = resume, None
        self.later, self.snapshot_later = {}, -1
        self.version = None
        PINNED_VERSION.set(-1)
        return "OK", f"unpinned: following the newest version again from offset {resume}"

    def unavailable(self, version: int) -> str | None:
        """None if ``version`` can be pinned (the replica has a model), else why not."""
        if self.history.get(version) is not None or (self.frozen_at is not None and version in self.later):
            return None
        return f"version {version} is not held ({self.held_text()})"

    def held_text(self) -> str:
        held = self.history.versions()
        if not held:
            return "none held"
        return (f"this replica holds {held[0]}..{held[-1]} ({len(held)} versions; "
                f"history_versions={self.history_versions})")
