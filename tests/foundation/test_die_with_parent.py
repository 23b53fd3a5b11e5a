"""``die_with_parent``: a serving process does not outlive a supervisor that was killed outright."""

import os
import signal
import subprocess
import sys
import textwrap
import time

# The middle process starts a grandchild that asks for SIGTERM on its parent's death, prints the
# grandchild's pid, and waits to be killed.
MIDDLE = textwrap.dedent("""
    import os, subprocess, sys
    code = ("import os, time; from headwater.cli.runtime import die_with_parent; "
            "assert die_with_parent(os.getppid()); print('armed', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "armed"
    print(child.pid, flush=True)
    child.wait()
""")


def _running(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "zombie" not in fh.read().lower()
    except OSError:
        return False


def test_grandchild_gets_sigterm_when_its_parent_is_killed():
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(middle.stdout.readline())
        assert _running(grandchild)
        middle.send_signal(signal.SIGKILL)  # no chance to clean up: only the kernel can tell
        middle.wait()
        deadline = time.monotonic() + 10
        while _running(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(grandchild)
    finally:
        if middle.poll() is None:
            middle.kill()
        try:
            os.kill(grandchild, signal.SIGKILL)
        except (OSError, NameError):
            pass
