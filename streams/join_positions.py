"""Where a replay of the joiner's input must start: per input partition, the oldest record whose
event is still pending.

The joiner's state is rebuilt from its input after every restart and every rebalance (see
:mod:`streams.joiner`): the input topics are its changelog. So the offset it commits for a
partition is not how far it has read but the oldest record it still needs: an impression whose
request has not closed, an action stored beside a pending request or parked until its impression
comes. Everything before that offset is reflected in durable output (examples, late, DLQ);
everything from it on is read again by whichever joiner owns the partition next, and the
re-emitted examples keep their ids (the trainer drops them). Actions it re-reads that the old
owner had already resolved are told apart by the hand-off record (:mod:`streams.join_handoff`),
not by this offset: an action is not sent to ``hw.late`` twice.

Per partition this keeps one counter per offset from the restart offset to the read position
(4 bytes a record of the join window), so finding the restart offset is one vectorised scan.
"""

from __future__ import annotations

import numpy as np

Partition = tuple[str, int]


class _Offsets:
    """Pending-event counts of one partition's offsets ``[base, end)``."""

    def __init__(self, first: int) -> None:
        self.base = first
        self.end = first  # next offset to read
        self.counts = np.zeros(1024, dtype=np.int32)

    def read(self, offset: int) -> None:
        if offset < self.base:
            raise ValueError(f"offset {offset} read again below the restart offset {self.base}")
        self.end = max(self.end, offset + 1)
        need = self.end - self.base
        if need > len(self.counts):
            grown = np.zeros(max(need, 2 * len(self.counts)), dtype=np.int32)
            grown[:len(self.counts)] = self.counts
            self.counts = grown

    def add(self, offsets: np.ndarray, n: int) -> None:
        idx = offsets - self.base
        if idx.size and (idx.min() < 0 or idx.max() >= self.end - self.base):
            raise ValueError(f"offsets outside [{self.base}, {self.end}) of what was read")
        np.add.at(self.counts, idx, n)
        if n < 0 and self.counts[np.unique(idx)].min() < 0:
            raise RuntimeError("an event was released more often than it was held")

    def restart(self) -> int:
        live = np.flatnonzero(self.counts[:self.end - self.base])
        first = self.base + int(live[0]) if live.size else self.end
        drop = first - self.base
        if drop > len(self.counts) // 2:  # forget what no replay will need, now and then
            kept = self.counts[drop:]
            self.counts = np.zeros(max(1024, len(kept)), dtype=np.int32)
            self.counts[:len(kept)] = kept
            self.base = first
        return first


class PendingOffsets:
    """The restart offset of every input partition read since the state was (re)built."""

    def __init__(self) -> None:
        self._parts: dict[Partition, _Offsets] = {}

    def read(self, partition: Partition, offset: int) -> None:
        """A record was read (pending or not): the restart offset may move past it."""
        part = self._parts.get(partition)
        if part is None:
            part = self._parts[partition] = _Offsets(offset)
        part.read(offset)

    def hold(self, partition: Partition, offsets, n: int = 1) -> None:
        """Records whose events (one each, or ``n``) went into the state."""
        self._change(partition, offsets, n)

    def release(self, partition: Partition, offsets) -> None:
        """Events that left the state with their output durable (one release per hold)."""
        self._change(partition, offsets, -1)

    def release_sources(self, done) -> None:
        """:meth:`release` for ``(topic, (partition, offset) or None)`` pairs, grouped."""
        by_partition: dict[Partition, list[int]] = {}
        for topic, source in done:
            if source is not None:
                by_partition.setdefault((topic, source[0]), []).append(source[1])
        for tp, offsets in by_partition.items():
            self.release(tp, offsets)

    def _change(self, partition: Partition, offsets, n: int) -> None:
        arr = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if arr.size:
            self._parts[partition].add(arr, n)

    def restart_offsets(self, partitions: set[Partition] | None = None) -> dict[Partition, int]:
        """``{partition: offset}`` to commit: a replay from there rebuilds every pending event."""
        return {tp: part.restart() for tp, part in self._parts.items()
                if partitions is None or tp in partitions}

    def read_ends(self, partitions: set[Partition]) -> dict[Partition, int]:
        """``{partition: next offset to read}`` of those read since the state was (re)built."""
        return {tp: part.end for tp, part in self._parts.items() if tp in partitions}

    def pending(self) -> int:
        """Events held in all partitions (for tests and metrics)."""
        return int(sum(p.counts[:p.end - p.base].sum() for p in self._parts.values()))
