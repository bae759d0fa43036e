"""Usage rows kept on disk while the database is down: a JSON-lines file in the gateway's state directory."""

from __future__ import annotations

import os
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

    def append(self, rows: list[Row]) -> None:
        data = _lines(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as spool:
            spool.write(data)
            spool.flush()
            # The rows exist nowhere else: make sure they survive a crash of the machine too.
            os.fsync(spool.fileno())

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[Row]:
        """Every row in the file; a line cut short by a crash while it was written is skipped."""
        rows = []
        for line in self.path.read_bytes().splitlines():
            try:
                fields = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            rows.append(tuple(fields.get(column) for column in USAGE_COLUMNS))
        return rows

    def replace(self, rows: list[Row]) -> None:
        """Keep only ``rows`` (the ones not yet stored), or remove the file when there are none."""
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        fresh = self.path.with_name(self.path.name + ".tmp")
        fresh.write_bytes(_lines(rows))
        os.replace(fresh, self.path)
