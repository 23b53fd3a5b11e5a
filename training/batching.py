"""Mini-batch forming from consumed ``hw.examples`` messages, by size or by time.

A mini-batch holds exactly ``batch_size`` rows when enough are pending, or whatever is pending
once the oldest row has waited ``max_wait_s`` (so a trickle still trains and syncs promptly).
Messages may be split across mini-batches; a message's offset counts as *done* only when its last
row has been handed out, which is what the checkpoint may record as consumed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

__all__ = ["MiniBatch", "BatchFormer", "warm_batch_rows", "WARM_MIN_ROWS"]

WARM_MIN_ROWS = 64  # a new model's first mini-batches


def warm_batch_rows(batch_size: int, trained: int, warmup_rows: int) -> int:
    """The rows of the next mini-batch of a model that has trained on ``trained`` examples: from
    :data:`WARM_MIN_ROWS` growing linearly to ``batch_size`` at ``warmup_rows`` (0: always
    ``batch_size``). Early on every update moves a cold model far, so more of them, each scoring
    the next rows with what the last taught, win: on 25k-30k-row logs (synthetic replicas of
    Amazon, Yelp, RetailRocket and REES46 exports; a 30k-row ``streams.log_world`` log) 0.012 to
    0.025 of AUC; on MovieLens' 100k ratings 0.002 lost (docs/benchmarks.md)."""
    if warmup_rows <= 0 or trained >= warmup_rows:
        return batch_size
    return min(batch_size, max(WARM_MIN_ROWS, batch_size * trained // warmup_rows))


class Columnar(Protocol):
    def __len__(self) -> int: ...
    def take(self, index: np.ndarray) -> Any: ...


@dataclass
class MiniBatch:
    """Rows to train on plus the offsets (next offset to read) fully covered once it is trained."""

    batch: Any
    done_offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.batch)


@dataclass
class _Piece:
    batch: Any
    key: tuple[str, int]
    offset: int
    arrived: float


def _default_concat(parts: list[Any]) -> Any:
    from streams.events import ExampleBatch

    return ExampleBatch.concat(parts)


class BatchFormer:
    """Queues decoded batches with their (topic, partition, offset) and cuts mini-batches."""

    def __init__(self, batch_size: int, max_wait_s: float,
                 concat: Callable[[list[Any]], Any] = _default_concat) -> None:
        if batch_size <= 0 or max_wait_s < 0:
            raise ValueError("batch_size must be positive and max_wait_s >= 0")
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self._concat = concat
        self._queue: deque[_Piece] = deque()
        self.pending_rows = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, batch: Columnar, topic: str, partition: int, offset: int, now: float) -> None:
        self._queue.append(_Piece(batch, (topic, partition), offset, now))
        self.pending_rows += len(batch)

    def ready(self, now: float) -> bool:
        if self.pending_rows >= self.batch_size:
            return True
        return bool(self._queue) and now - self._queue[0].arrived >= self.max_wait_s

    def wait_s(self, now: float) -> float:
        """Seconds until a mini-batch is due (0 if one is; inf if nothing is pending)."""
        if self.pending_rows >= self.batch_size:
            return 0.0
        if not self._queue:
            return float("inf")
        return max(0.0, self._queue[0].arrived + self.max_wait_s - now)

    def warm_up(self, cfg: Any, trained: int) -> None:
        """Sizes the next mini-batch (``cfg``: the trainer's ``batch_size`` and
        ``batch_warmup_rows``): :func:`warm_batch_rows` for a model that has trained on
        ``trained`` examples while the trainer keeps up; ``batch_size`` with a full batch pending
        (behind, throughput comes first)."""
        full = cfg.batch_size
        behind = self.pending_rows >= full
        self.batch_size = full if behind else warm_batch_rows(full, trained, cfg.batch_warmup_rows)

    def pop_ready(self, now: float, flush: bool = False, limit: int | None = None) -> list[MiniBatch]:
        """The mini-batches that are due (all pending rows when ``flush``), at most ``limit``."""
        out: list[MiniBatch] = []
        while self._queue and (flush or self.ready(now)) and (limit is None or len(out) < limit):
            out.append(self._cut())
        return out

    def _cut(self) -> MiniBatch:
        parts, done, need = [], {}, self.batch_size
        while self._queue and need > 0:
            piece = self._queue[0]
            n = len(piece.batch)
            if n <= need:
                self._queue.popleft()
                if n:
                    parts.append(piece.batch)
                done[piece.key] = max(done.get(piece.key, 0), piece.offset + 1)
                need -= n
            else:
                parts.append(piece.batch.take(np.arange(need)))
                piece.batch = piece.batch.take(np.arange(need, n))
                need = 0
        # Empty messages at the head are done as soon as everything before them is.
        while self._queue and len(self._queue[0].batch) == 0:
            piece = self._queue.popleft()
            done[piece.key] = max(done.get(piece.key, 0), piece.offset + 1)
        rows = self.batch_size - need
        self.pending_rows -= rows
        batch = parts[0] if len(parts) == 1 else self._concat(parts)
        return MiniBatch(batch, done)
