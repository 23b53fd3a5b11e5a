"""Helpers shared by the demo tests."""

import os


def processes_matching(*needles: str) -> set[int]:
    """Live (non-zombie) pids whose command line contains any of ``needles``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(n in cmd for n in needles):
            found.add(int(entry))
    return found
