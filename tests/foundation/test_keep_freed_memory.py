"""The CLI's glibc tuning: big freed tensor buffers stay in the heap for reuse, not unmapped."""

import json
import os
import subprocess
import sys

# Reports where glibc put a 64 MiB tensor (mmapped or heap) and how much free heap is kept after.
_PROBE = """
import ctypes, json, sys, torch
from headwater.cli.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
mapped0 = libc.mallinfo2().hblkhd
t = torch.ones(16 << 20)
mapped = libc.mallinfo2().hblkhd - mapped0
del t
print(json.dumps({"applied": applied, "mmapped": mapped, "free_heap_kept": libc.mallinfo2().fordblks}))
"""


def _probe(mode: str, env: dict | None = None) -> dict:
    # A fresh interpreter each: the setting is process-wide and only affects later allocations.
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("MALLOC_")}
    if mode == "child":  # started by a process that called keep_freed_memory
        code = ("import os, subprocess, sys; from headwater.cli.runtime import keep_freed_memory; "
                "keep_freed_memory(); sys.stdout.write(subprocess.run([sys.executable, '-c', sys.argv[1], "
                "'default'], capture_output=True, text=True, check=True).stdout)")
        out = subprocess.run([sys.executable, "-c", code, _PROBE], capture_output=True, text=True,
                             check=True, env=env)
    else:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                             check=True, env=env)
    return json.loads(out.stdout)


def test_keep_freed_memory_serves_big_buffers_from_the_heap_and_keeps_them_after_free():
    default, tuned = _probe("default"), _probe("tuned")
    # glibc's default: a 64 MiB buffer is its own mapping, unmapped on free, so the next step
    # faults all of its pages in again.
    assert default["mmapped"] >= 64 << 20
    assert tuned["applied"] is True
    assert tuned["mmapped"] == 0
    assert tuned["free_heap_kept"] >= 64 << 20


def test_processes_started_after_keep_freed_memory_inherit_it():
    child = _probe("child")
    assert child["applied"] is None  # the child itself never called it
    assert child["mmapped"] == 0 and child["free_heap_kept"] >= 64 << 20
