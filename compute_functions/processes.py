"""Whether a process, or any process of a group, still runs on this node, zombies counted as gone.

Both questions are answered from ``/proc/PID/stat``, read in one place here. The standard library is enough, and
psutil (which reads the same file on Linux) would be one more compiled package to install into every worker
environment, which operators build by hand with ``--no-deps``. Where ``/proc`` cannot tell, a signal 0 answers
instead, zombies included.
"""

from __future__ import annotations

import os


def _stat(pid: int | str) -> tuple[bytes, int] | None:
    """The state letter and the process group of ``pid``, or None when it has no ``/proc`` entry.

    Raises ``OSError`` when the entry is there but cannot be read.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return None
    # The command name, in parentheses, may hold spaces and parentheses: the fields start after the last one.
    fields = stat.rsplit(b")", 1)[1].split()
    return fields[0], int(fields[2])


def _running(state: bytes) -> bool:
    return state not in (b"Z", b"X")


def alive(pid: object) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        found = _stat(pid)
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return found is not None and _running(found[0])


def group_alive(group: int) -> bool:
    """Whether any process of ``group`` still runs.

    Zombies do not count: once killed they hold nothing, and the init process of some containers reaps orphans only
    after a delay.
    """
    try:
        entries = os.listdir("/proc")
    except OSError:
        entries = []
    if not entries:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            found = _stat(entry)
        except OSError:
            continue
        if found is not None and found[1] == group and _running(found[0]):
            return True
    return False
