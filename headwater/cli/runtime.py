"""Process helpers shared by the long-running commands: clean stop on SIGTERM/SIGINT, JSON output."""

from __future__ import annotations

import ctypes
import json
import os
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


def exit_on_sigterm() -> None:
    """SIGTERM raises ``SystemExit(143)`` in the main thread, so that ``finally`` blocks run:
    a command that started processes (a bench's broker and pipeline) stops them instead of
    leaving them behind, as the default disposition (die at once) did. Long-running commands
    replace it with :func:`stop_on_signals`."""
    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():  # main() called from a thread: skip
        signal.signal(signal.SIGTERM, handler)


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
    """Makes glibc keep freed tensor buffers for reuse instead of handing them back to the kernel,
    in this process and (through the environment) in the processes it starts.

    A training step or a batched serving forward allocates and frees many multi-megabyte
    activations. By default glibc serves those with ``mmap`` and unmaps them on free, so every
    step faults its working set in again page by page: on a 2-core VM that was a fifth of the
    tower's forward/backward (bench trainer) and a third of a 64-call serving forward. Raised
    mmap and trim thresholds serve them from the heap, which is recycled. ``mallopt`` covers this
    process; ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (read by glibc at start-up, an
    operator's own values win) cover spawned children: benchmark servers, trainer ranks, the
    demo's roles. Returns False where the C library is not glibc (nothing changes there).
    """
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(mmap_threshold))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(trim_threshold))
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))
                    and libc.mallopt(_M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"])))
    except (OSError, AttributeError, ValueError):
        return False


_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


def die_with_parent(parent_pid: int) -> bool:
    """Asks the kernel to send this process SIGTERM when its parent dies (Linux ``prctl``), so the
    children of a supervisor that was killed outright do not keep serving unsupervised. Exits at
    once if the parent is already gone. Returns False where ``prctl`` is unavailable."""
    try:
        ok = ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
    return ok
