"""Usage rows kept on disk while the database is down: a JSON-lines file in the gateway's state directory.

Replicas that share a state folder share the file, so every change to it holds its lock (``flock`` on a file beside
it): a replay reads, stores and rewrites the file whole while the others' rows wait to be appended after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from gateway.storage.database import USAGE_COLUMNS

Row = tuple[Any, ...]


def _lines(rows: list[Row]) -> bytes:
    # Named fields, so that a spool written before a schema change still replays after it.
    return b"".join(
        orjson.dumps(dict(zip(USAGE_COLUMNS, row, strict=True)), option=orjson.OPT_APPEND_NEWLINE) for row in rows
    )


class Spool:
    """An append-only file of usage rows; every method blocks, so callers run them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def hold(self) -> int:
        """Take the spool's lock, waiting for another process (or thread) that holds it; returns what ``release``
        takes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except BaseException:
            os.close(handle)
            raise
        return handle

    def release(self, handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        handle = self.hold()
        try:
            yield
        finally:
            self.release(handle)

    def append(self, rows: list[Row]) -> None:
        data = _lines(rows)
        with self._locked(), open(self.path, "ab") as spool:
            spool.write(data)
            spool.flush()
            # The rows exist nowhere else: make sure they survive a crash of the machine too.
            os.fsync(spool.fileno())

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[Row]:
        """Every row in the file (none when another replica replayed and removed it); a line cut short by a crash
        while it was written is skipped. Read with the lock held."""
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in content.splitlines():
            try:
                fields = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            rows.append(tuple(fields.get(column) for column in USAGE_COLUMNS))
        return rows

    def replace(self, rows: list[Row]) -> None:
        """Keep only ``rows`` (the ones not yet stored), or remove the file when there are none. With the lock held."""
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        fresh = self.path.with_name(self.path.name + ".tmp")
        fresh.write_bytes(_lines(rows))
        os.replace(fresh, self.path)
