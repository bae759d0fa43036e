"""Usage rows kept on disk while the database is down: a JSON-lines file in the gateway's state directory."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson


class Spool:
    """An append-only file of rows; every method blocks, so callers run them in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, rows: list[dict[str, Any]]) -> None:
        data = b"".join(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as spool:
            spool.write(data)
            spool.flush()
            # The rows exist nowhere else: make sure they survive a crash of the machine too.
            os.fsync(spool.fileno())

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[dict[str, Any]]:
        """Every row in the file; a line cut short by a crash while it was written is skipped."""
        rows = []
        for line in self.path.read_bytes().splitlines():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            row["created_at"] = datetime.fromisoformat(row["created_at"])
            rows.append(row)
        return rows

    def replace(self, rows: list[dict[str, Any]]) -> None:
        """Keep only ``rows`` (the ones not yet stored), or remove the file when there are none."""
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        fresh = self.path.with_name(self.path.name + ".tmp")
        fresh.write_bytes(b"".join(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows))
        os.replace(fresh, self.path)
