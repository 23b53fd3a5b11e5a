"""The supervisor restarts crashed children, lets finite children end, and leaves no process
behind when stopped."""

import os
import sys
import time

import pytest

from headwater.supervisor import ChildFailed, ChildSpec, Supervisor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie counts as gone
        return f.read().split()[2] != "Z"


def test_crashed_child_is_restarted(tmp_path):
    marker = tmp_path / "runs"
    code = f"open({str(marker)!r}, 'a').write('x'); import sys; sys.exit(3)"
    sup = Supervisor([ChildSpec("crasher", [sys.executable, "-c", code], max_restarts=2)])
    with sup:
        deadline = time.monotonic() + 20
        while marker.exists() is False or len(marker.read_text()) < 3:
            time.sleep(0.05)
            try:
                sup.poll()
            except RuntimeError:
                break
            assert time.monotonic() < deadline
    assert len(marker.read_text()) == 3  # first run + 2 restarts


def test_stop_kills_children_and_their_children(tmp_path):
    pidfile = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    sup = Supervisor([ChildSpec("parent", [sys.executable, "-c", code])], stop_timeout_s=2)
    sup.start_all()
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child_pid = sup.children["parent"].proc.pid
    grandchild = int(pidfile.read_text())
    sup.stop()
    time.sleep(0.2)
    assert not _alive(child_pid)
    assert not _alive(grandchild)


def _poll_for(sup: Supervisor, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sup.poll()
        time.sleep(0.05)


def test_finite_child_that_exits_0_is_done_not_restarted(tmp_path):
    marker = tmp_path / "runs"
    code = f"open({str(marker)!r}, 'a').write('x')"
    sup = Supervisor([ChildSpec("job", [sys.executable, "-c", code], max_restarts=0, finite=True),
                      ChildSpec("service", [sys.executable, "-c", "import time; time.sleep(600)"])],
                     stop_timeout_s=2)
    with sup:
        deadline = time.monotonic() + 20
        while not sup.done("job"):
            sup.poll()  # must not raise: the job's exit 0 is its end, not a crash
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _poll_for(sup, 1.0)
        assert sup.done("job") and not sup.done("service")
    assert marker.read_text() == "x"  # ran once


def test_finite_child_that_fails_is_a_crash(tmp_path):
    marker = tmp_path / "runs"
    code = f"open({str(marker)!r}, 'a').write('x'); import sys; sys.exit(2)"
    log_file = tmp_path / "job.log"
    sup = Supervisor([ChildSpec("job", [sys.executable, "-c", code], max_restarts=1, finite=True,
                                log_file=log_file)])
    with sup:
        with pytest.raises(ChildFailed) as err:
            _poll_for(sup, 20)
    assert (err.value.name, err.value.code, err.value.log_file) == ("job", 2, log_file)
    assert not sup.done("job")
    assert marker.read_text() == "xx"  # first run + its one restart


def test_service_child_that_exits_0_is_restarted(tmp_path):
    marker = tmp_path / "runs"
    code = f"open({str(marker)!r}, 'a').write('x')"
    sup = Supervisor([ChildSpec("service", [sys.executable, "-c", code], max_restarts=2)])
    with sup:
        with pytest.raises(ChildFailed):
            _poll_for(sup, 20)
    assert marker.read_text() == "xxx"
