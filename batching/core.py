"""Generic budgeted batch forming: a priority queue with ageing and deadlines, and a greedy packer.

Shared by the LLM scheduler (items are requests, cost is tokens of the next chunk) and the
recommender's micro-batcher (items are scoring requests, cost is candidate rows). Order is
``(effective priority, deadline, arrival)`` where effective priority improves by one level per
``aging_s`` seconds of waiting, so a steady stream of urgent work cannot starve the rest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class QueueItem(Generic[T]):
    """An entry: its payload, priority (lower first), arrival time and optional deadline."""

    key: Hashable
    payload: T
    priority: int = 0
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = math.inf


class BatchQueue(Generic[T]):
    """Waiting items by key; ``ordered(now)`` lists them in service order."""

    def __init__(self, aging_s: float = 30.0):
        self.aging_s = aging_s
        self.items: dict[Hashable, QueueItem[T]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item: QueueItem[T]) -> None:
        if item.key in self.items:
            raise KeyError(f"duplicate key {item.key!r}")
        self.items[item.key] = item

    def remove(self, key: Hashable) -> QueueItem[T] | None:
        return self.items.pop(key, None)

    def sort_key(self, item: QueueItem[T], now: float) -> tuple[float, float, float]:
        age = max(now - item.arrival, 0.0)
        eff = item.priority - (age / self.aging_s if self.aging_s > 0 else 0.0)
        return (math.floor(eff), item.deadline, item.arrival)

    def ordered(self, now: float | None = None) -> list[QueueItem[T]]:
        now = time.monotonic() if now is None else now
        return sorted(self.items.values(), key=lambda it: self.sort_key(it, now))


def form_batch(queue: BatchQueue[T], budget: int, max_items: int,
               admit: Callable[[QueueItem[T], int], int], now: float | None = None) -> list[tuple[QueueItem[T], int]]:
    """Take items in service order while budget lasts.

    ``admit(item, remaining)`` returns the cost granted to the item (``0`` = cannot take it now,
    which stops the batch so later items do not overtake it) and may grant less than asked
    (chunking). Taken items are removed from the queue.
    """
    out: list[tuple[QueueItem[T], int]] = []
    for item in queue.ordered(now):
        if budget <= 0 or len(out) >= max_items:
            break
        cost = admit(item, budget)
        if cost <= 0:
            break
        queue.remove(item.key)
        out.append((item, cost))
        budget -= cost
    return out
