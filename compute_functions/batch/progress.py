"""Where a batch stands: its progress record, the output files it is written from, and when a slice stops."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from compute_functions.batch.folder import CANCEL, ERRORS, PROGRESS, RESULTS, BatchRefused, Folder, write_all

_LINE_NUMBER = re.compile(rb'^\{"line":(\d+),')
_CHECKPOINT_SECONDS = 1.0
# How often a running slice looks for the cancel flag.
CANCEL_CHECK_SECONDS = 0.25


@dataclass
class Progress:
    """Where a batch stands, as ``progress.json`` keeps it; everything in it is bounded by the concurrency.

    Lines before ``next_line`` have been read: each is answered (in ``results.jsonl`` or ``errors.jsonl``) unless it
    is in ``pending`` (with its offset in the input, to read it again). Lines from ``next_line`` on are unread except
    those in ``skip``, answered by a run that ended before its checkpoint could move ``next_line`` past them.
    """

    total: int | None = None
    next_line: int = 1
    next_offset: int = 0
    pending: dict[int, int] = field(default_factory=dict)
    skip: set[int] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    results_bytes: int = 0
    errors_bytes: int = 0
    input_size: int = 0
    input_head: str = ""
    state: str = "running"
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def answered(self) -> int:
        return self.completed + self.failed

    def to_json(self, batch_id: str) -> bytes:
        record = {
            "batch_id": batch_id,
            "state": self.state,
            "total": self.total,
            "completed": self.completed,
            "failed": self.failed,
            "next_line": self.next_line,
            "next_offset": self.next_offset,
            "pending": sorted(self.pending.items()),
            "skip": sorted(self.skip),
            "results_bytes": self.results_bytes,
            "errors_bytes": self.errors_bytes,
            "input_size": self.input_size,
            "input_head": self.input_head,
            "errors": self.errors,
            "updated_at": time.time(),
        }
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Progress:
        record = json.loads(data)
        return cls(
            total=record["total"],
            next_line=int(record["next_line"]),
            next_offset=int(record["next_offset"]),
            pending={int(line): int(offset) for line, offset in record["pending"]},
            skip={int(line) for line in record["skip"]},
            completed=int(record["completed"]),
            failed=int(record["failed"]),
            results_bytes=int(record["results_bytes"]),
            errors_bytes=int(record["errors_bytes"]),
            input_size=int(record["input_size"]),
            input_head=str(record["input_head"]),
            state=str(record["state"]),
            errors=list(record.get("errors") or []),
        )

    def take_answered(self, line: int) -> bool:
        """Count ``line`` as answered by a line found in an output file; False if it already was."""
        if line in self.pending:
            del self.pending[line]
            return True
        if line >= self.next_line and line not in self.skip:
            self.skip.add(line)
            return True
        return False


class Outputs:
    """The results and errors files, opened for appending, and the checkpoints that make them durable."""

    def __init__(self, folder: Folder, batch_id: str, progress: Progress) -> None:
        self.folder = folder
        self.batch_id = batch_id
        self.progress = progress
        self.results = folder.open_file(RESULTS, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        self.errors = folder.open_file(ERRORS, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        self._recover(self.results, "results_bytes", "completed")
        self._recover(self.errors, "errors_bytes", "failed")
        self.last_checkpoint = time.monotonic()

    def _recover(self, fd: int, size_field: str, count_field: str) -> None:
        """Take in what an earlier run wrote after its last checkpoint; drop a line it was cut off in."""
        recorded = getattr(self.progress, size_field)
        size = os.fstat(fd).st_size
        if size < recorded:
            raise BatchRefused(
                "output_damaged", f"{self.folder.path} holds less than its progress record says was written."
            )
        if size == recorded:
            return
        end = recorded
        counted = getattr(self.progress, count_field)
        with os.fdopen(os.dup(fd), "rb") as handle:
            handle.seek(recorded)
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                end += len(raw)
                match = _LINE_NUMBER.match(raw)
                if match and self.progress.take_answered(int(match.group(1))):
                    counted += 1
        if end < size:
            os.ftruncate(fd, end)
        setattr(self.progress, count_field, counted)

    def answer(self, line: int, custom_id: str | None, status: int, request_id: str, body: bytes) -> None:
        """Write a successful answer; ``body`` is the server's JSON object on one line (``one_line_json``)."""
        head = {"line": line, "id": f"{self.batch_id}-{line}", "custom_id": custom_id}
        prefix = json.dumps(head, separators=(",", ":"))[:-1].encode()
        response = b'{"status_code":%d,"request_id":%s,"body":' % (status, json.dumps(request_id).encode())
        write_all(self.results, prefix + b',"response":' + response + body + b'},"error":null}\n')
        self.progress.pending.pop(line, None)
        self.progress.completed += 1

    def fail(
        self, line: int, custom_id: str | None, code: str, message: str, response: dict[str, Any] | None = None
    ) -> None:
        record = {
            "line": line,
            "id": f"{self.batch_id}-{line}",
            "custom_id": custom_id,
            "response": response,
            "error": {"code": code, "message": message},
        }
        write_all(self.errors, json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self.progress.pending.pop(line, None)
        self.progress.failed += 1

    def checkpoint(self) -> None:
        os.fsync(self.results)
        os.fsync(self.errors)
        self.progress.results_bytes = os.fstat(self.results).st_size
        self.progress.errors_bytes = os.fstat(self.errors).st_size
        self.folder.replace(PROGRESS, self.progress.to_json(self.batch_id))
        self.last_checkpoint = time.monotonic()

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self.last_checkpoint >= _CHECKPOINT_SECONDS

    def close(self) -> None:
        os.close(self.results)
        os.close(self.errors)


class Stop:
    """When a slice stops taking new lines: its time is up, or the batch was cancelled."""

    def __init__(self, folder: Folder, budget: float) -> None:
        self.folder = folder
        self.deadline = time.monotonic() + budget
        self.cancelled = False
        self._checked = 0.0

    def now(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= CANCEL_CHECK_SECONDS:
            self._checked = now
            self.cancelled = self.cancelled or self.folder.exists(CANCEL)
        return self.cancelled or now >= self.deadline
