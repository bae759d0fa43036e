"""Whether a process or a process group still runs, as the node's watchdog and request server ask it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from compute_functions.processes import alive, group_alive


def test_a_running_process_is_alive_and_a_zombie_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert alive(child.pid)
    assert child.stdin is not None
    child.stdin.close()
    # Not reaped yet: a zombie, which holds nothing.
    deadline = time.monotonic() + 10
    while alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(child.pid)
    assert child.wait() == 0


def test_what_is_not_a_pid_is_not_alive() -> None:
    assert alive(os.getpid())
    for pid in (None, "1", 0, -1, 1.5):
        assert not alive(pid)


def test_a_group_is_alive_while_one_of_its_processes_runs() -> None:
    leader = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        assert group_alive(leader.pid)
        assert group_alive(os.getpgid(0))
    finally:
        assert leader.stdin is not None
        leader.stdin.close()
    deadline = time.monotonic() + 10
    while group_alive(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not group_alive(leader.pid)
    leader.wait()
