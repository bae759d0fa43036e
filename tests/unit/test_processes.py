"""Whether a process or a process group still runs, as the node's watchdog and request server ask it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from compute_functions.processes import alive, group_alive

WAIT_FOR_STDIN = [sys.executable, "-c", "import sys; sys.stdin.read()"]


def gone(running: Callable[[int], bool], pid: int) -> bool:
    """Whether ``running(pid)`` turns False within ten seconds."""
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not running(pid)


def test_a_running_process_is_alive_and_a_zombie_is_not() -> None:
    child = subprocess.Popen(WAIT_FOR_STDIN, stdin=subprocess.PIPE)
    assert alive(child.pid)
    assert child.stdin is not None
    child.stdin.close()
    # Not reaped until wait(): a zombie meanwhile, which holds nothing.
    assert gone(alive, child.pid)
    assert child.wait() == 0


def test_what_is_not_a_pid_is_not_alive() -> None:
    assert alive(os.getpid())
    for pid in (None, "1", 0, -1, 1.5):
        assert not alive(pid)


def test_a_group_is_alive_while_one_of_its_processes_runs() -> None:
    leader = subprocess.Popen(WAIT_FOR_STDIN, stdin=subprocess.PIPE, start_new_session=True)
    assert group_alive(leader.pid)
    assert group_alive(os.getpgid(0))
    assert leader.stdin is not None
    leader.stdin.close()
    assert gone(group_alive, leader.pid)
    leader.wait()
