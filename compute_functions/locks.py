"""An exclusive lock between the processes of one node: ``flock`` on a file, waited for until a deadline.

``fcntl.flock`` held on an open descriptor is the whole lock: the kernel lets it go when the holder exits, however
it ends, so a killed worker never leaves a stale lock behind. The filelock library wraps the same call but opens the
file by its path itself, and a batch's lock must be opened relative to the batch's folder and never through a
symbolic link; so the caller opens the file and this helper only waits for the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

_POLL = 0.05


@contextlib.contextmanager
def held(fd: int, deadline: float) -> Iterator[bool]:
    """Hold the exclusive lock of the open file ``fd`` for the block; it yields False if ``deadline`` (a
    ``time.monotonic()`` value) passes before the lock is free. ``fd`` is closed at the end, which releases the lock.
    """
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(_POLL)
        yield True
    finally:
        os.close(fd)
