"""Helpers shared by the chaos tests."""

import time


def drain_joiner(joiner, timeout_s: float = 60.0) -> None:
    """Steps an in-process joiner until it has read everything and closed every window (ten
    idle steps in a row with nothing pending), then closes it."""
    try:
        deadline, quiet, seen = time.monotonic() + timeout_s, 0, 0
        while time.monotonic() < deadline and quiet < 10:
            stats = joiner.step(timeout_ms=100)
            seen += stats.records
            idle = seen and stats.records == 0 and joiner.state.count_pending() == 0
            quiet = quiet + 1 if idle else 0
    finally:
        joiner.close()
