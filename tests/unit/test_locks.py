"""The node's file lock: held by one process at a time, waited for until a deadline, gone with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compute_functions.locks import held

HOLDER = (
    "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
    "print('held', flush=True); sys.stdin.read()"
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that holds the lock of ``tmp_path / "lock"`` until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def open_lock(tmp_path: Path) -> int:
    return os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT)


def test_a_free_lock_is_held_for_the_block_and_let_go_after(tmp_path: Path) -> None:
    with held(open_lock(tmp_path), time.monotonic()) as owned:
        assert owned
        with held(open_lock(tmp_path), time.monotonic()) as second:
            assert not second
    with held(open_lock(tmp_path), time.monotonic()) as again:
        assert again


def test_a_lock_held_elsewhere_is_waited_for_until_the_deadline(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    started = time.monotonic()
    with held(open_lock(tmp_path), started + 0.3) as owned:
        assert not owned
    assert 0.3 <= time.monotonic() - started < 2
    assert holder.stdin is not None
    holder.stdin.close()
    with held(open_lock(tmp_path), time.monotonic() + 10) as owned:
        assert owned


def test_a_killed_holder_leaves_no_lock_behind(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    with held(open_lock(tmp_path), time.monotonic() + 10) as owned:
        assert owned


def test_the_file_is_closed_whether_the_lock_was_had_or_not(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    for wait in (0.0, 10.0):
        fd = open_lock(tmp_path)
        if wait:
            holder.kill()
        with held(fd, time.monotonic() + wait):
            pass
        with pytest.raises(OSError):
            os.fstat(fd)
