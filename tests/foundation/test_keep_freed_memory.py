"""The CLI's glibc tuning: big freed tensor buffers stay in the heap for reuse, not unmapped."""

import json
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


def _probe(mode: str) -> dict:
    # A fresh interpreter each: the setting is process-wide and only affects later allocations.
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_keep_freed_memory_serves_big_buffers_from_the_heap_and_keeps_them_after_free():
    default, tuned = _probe("default"), _probe("tuned")
    # glibc's default: a 64 MiB buffer is its own mapping, unmapped on free, so the next step
    # faults all of its pages in again.
    assert default["mmapped"] >= 64 << 20
    assert tuned["applied"] is True
    assert tuned["mmapped"] == 0
    assert tuned["free_heap_kept"] >= 64 << 20
