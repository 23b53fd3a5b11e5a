"""Process helpers shared by the long-running commands: clean stop on SIGTERM/SIGINT, JSON output."""

from __future__ import annotations

import ctypes
import json
import signal
import sys
import threading
from typing import Any


def stop_on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT; a second SIGINT raises KeyboardInterrupt."""
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def print_json(obj: Any) -> None:
    """Prints one JSON object on one line (benchmarks' and summaries' contract) and flushes."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Makes glibc keep freed tensor buffers for reuse instead of handing them back to the kernel.

    A training step allocates and frees dozens of multi-megabyte activations and gradients. By
    default glibc serves those with ``mmap`` and unmaps them on free, so every step faults its
    working set in again page by page: on a 2-core VM that was a quarter of the tower's
    forward/backward time. Raising the mmap and trim thresholds serves them from the heap, which
    is recycled. Same effect as ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the
    environment, without needing them set before the interpreter starts. Returns False where
    the C library is not glibc (nothing changes there).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                    and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
