"""A read-only CPU batch split over two threads: this one and one pool thread.

Both run a compiled kernel or a NumPy call that releases the GIL, so on two cores a large lookup
(or the bench's ceiling gather, timed the same way) takes both.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

__all__ = ["lookup_threads", "split_batch"]

_SPLIT_MIN = 16_384  # ids per CPU lookup above which two threads share the work
_CHUNK = 8_192  # ids per share of a split lookup
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedding-lookup")
    return _POOL


def lookup_threads(n: int) -> int:
    """Threads a read-only CPU lookup of ``n`` ids may run on (see :func:`split_batch`)."""
    return 1 if n < _SPLIT_MIN else 2


def split_batch(part: Callable[[int, int], None], n: int) -> None:
    """Runs ``part(lo, hi)`` over ``[0, n)``: at once for a small batch, else in chunks that this
    thread and a pool thread take in turn. ``part`` must release the GIL (a compiled kernel, a
    NumPy take). Chunks, not halves, because the cores are shared: when the pool thread gets no
    core soon, this one takes the chunks it would have had (and does not wait for it at all if
    it never started) instead of idling behind a stalled half; a blocked waiter does not spin
    (unlike OpenMP). ``headwater bench embedding`` times its ceiling gather through this too."""
    if lookup_threads(n) == 1:
        part(0, n)
        return
    starts = iter(range(0, n, _CHUNK))  # one iterator for both threads: next() holds the GIL

    def work() -> None:
        for lo in starts:
            part(lo, min(n, lo + _CHUNK))

    fut = _pool().submit(work)
    try:
        work()
    finally:
        if not fut.cancel():  # it started: wait for the chunk it holds
            fut.result()
