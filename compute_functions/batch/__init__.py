"""The ``run_batch`` compute function: a slice of one batch job, run next to the model and safe to run again.

The gateway calls it over and over until the batch is done; each call works for about ``time_budget`` seconds.
Every call picks up where the last one stopped, however that one ended (its time was up, the batch was cancelled,
the worker or the gateway was killed): an answered line is never sent again and an unanswered one is never lost.

A batch's folder (the gateway names it; it lies inside the roots the cluster allows)::

    results.jsonl   one line per answered input line, in the order they finished: {"line": N, "id",
                    "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error": null}
    errors.jsonl    one line per input line that failed (bad JSON, refused by the model server, ...):
                    {"line": N, "id", "custom_id", "response": {...} | null, "error": {"code", "message"}}
    progress.json   where the batch stands (``Progress``); replaced whole at each checkpoint
    cancel          made by the gateway to stop the batch: no new request goes out a quarter second later
    lock            flock'd by the one process running the batch, so that two runs never write at once

``N`` is the 1-based line number in the input; blank lines are skipped and count for nothing. Each result is
written (one ``write``) as soon as it arrives; the files are fsync'd before each checkpoint, and a checkpoint
records their sizes, so a later run reads only what was written after it.

The request::

    {"batch_id", "input": path, "output": the batch's folder, "allowed_roots": [paths],
     "model": the name lines may give, "backend_model": the name the server knows,
     "endpoint": "/v1/chat/completions" | ... | None (None: each line's fields tell),
     "max_lines", "max_line_bytes", "concurrency", "time_budget", "timeout", "lock_wait" (seconds),
     "base_url" + "headers" (a server the gateway reaches directly) or "model_server" (launched on this node),
     "offline_runner": None | {"command": [...], "chunk_lines": n, "env": {...}}}

The result is ``{"ok": True, "state": "running" | "completed" | "cancelled" | "busy" | "failed", "total",
"completed", "failed", "errors": [...]}``, or ``{"ok": False, "error": {"kind", "message"}}`` when the model
server could not be reached (the gateway tries again later). It never raises for an expected failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend_http.client import Answer, Http, ServerUnreachable
from compute_functions import locks, node
from compute_functions.model_server import ModelServerFailed

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
PROGRESS = "progress.json"
CANCEL = "cancel"
LOCK = "lock"

OPERATIONS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
# Where a request-line's operation comes from when the batch does not name one: the field that carries the input.
_INPUT_FIELDS = (("messages", "chat/completions"), ("prompt", "completions"), ("input", "embeddings"))
_OFFLINE_OPERATIONS = frozenset({"chat/completions", "embeddings"})
_LINE_NUMBER = re.compile(rb'^\{"line":(\d+),')
_HEAD_BYTES = 64 * 1024
_CHECKPOINT_SECONDS = 1.0
_CANCEL_CHECK_SECONDS = 0.25
# A request that failed on the server's side (5xx, 429, timeout) is tried this many times in all.
_ATTEMPTS = 3
# Refused connections in a row before the model server counts as gone and the slice stops.
_UNREACHABLE_AFTER = 5
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class BatchRefused(Exception):
    """The batch cannot run at all (paths outside the roots, too many lines, input changed); it fails."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------- paths


def inside(path: Path, roots: list[str]) -> bool:
    """Whether ``path`` (already resolved) lies in one of ``roots`` (each resolved here)."""
    return any(path.is_relative_to(Path(root).resolve()) for root in roots)


def checked_path(raw: str, roots: list[str], what: str, *, must_exist: bool) -> Path:
    """``raw`` resolved (symlinks and `..` included); ``BatchRefused`` unless it is absolute and inside ``roots``."""
    if "\0" in raw:
        # The operating system cannot take it, and Python says so with a ValueError, not an OSError.
        raise BatchRefused("invalid_path", f"The {what} path {raw!r} contains a NUL byte.")
    path = Path(raw)
    if not path.is_absolute():
        raise BatchRefused("invalid_path", f"The {what} must be an absolute path, not '{raw}'.")
    try:
        resolved = path.resolve(strict=must_exist)
    except FileNotFoundError:
        raise BatchRefused("file_not_found", f"The {what} '{raw}' does not exist.") from None
    except (OSError, RuntimeError) as exc:
        raise BatchRefused("invalid_path", f"The {what} '{raw}' cannot be resolved: {exc}.") from None
    if not inside(resolved, roots):
        raise BatchRefused(
            "path_not_allowed",
            f"The {what} '{raw}' resolves to '{resolved}', which is outside the folders batches may use here: "
            f"{', '.join(str(Path(root).resolve()) for root in roots)}.",
        )
    return resolved


def _opened_inside(fd: int, roots: list[str], what: str) -> None:
    """Check what ``fd`` really is, after the opening: a symlink swapped in since the check is caught here."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return
    if not inside(real, roots):
        raise BatchRefused("path_not_allowed", f"The {what} moved outside the folders batches may use here.")


@dataclass
class _Folder:
    """The batch's folder, held open so that every file in it is opened relative to the folder itself."""

    path: Path
    fd: int

    @classmethod
    def open(cls, raw: str, roots: list[str]) -> _Folder:
        path = checked_path(raw, roots, "output folder", must_exist=False)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        except OSError as exc:
            raise BatchRefused("invalid_path", f"The output folder '{raw}' cannot be used: {exc.strerror}.") from None
        folder = cls(path, fd)
        try:
            _opened_inside(fd, roots, "output folder")
        except BatchRefused:
            folder.close()
            raise
        return folder

    def open_file(self, name: str, flags: int, mode: int = 0o640) -> int:
        try:
            return os.open(name, flags | _NOFOLLOW, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BatchRefused("path_not_allowed", f"'{self.path / name}' is a symbolic link.") from None
            raise

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def replace(self, name: str, data: bytes) -> None:
        partial = f".{name}.{os.getpid()}"
        fd = self.open_file(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def read(self, name: str) -> bytes | None:
        try:
            fd = self.open_file(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def close(self) -> None:
        os.close(self.fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---------------------------------------------------------------------------------------------- progress


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

    def __init__(self, folder: _Folder, batch_id: str, progress: Progress) -> None:
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
        _write_all(self.results, prefix + b',"response":' + response + body + b'},"error":null}\n')
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
        _write_all(self.errors, json.dumps(record, separators=(",", ":")).encode() + b"\n")
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


# ---------------------------------------------------------------------------------------------- input


def _read_line(handle: Any, limit: int) -> tuple[bytes | None, int]:
    """The next line and its size in bytes; None for a line longer than ``limit`` (skipped, not held in memory)."""
    raw: bytes = handle.readline(limit + 1)
    size = len(raw)
    if size <= limit or raw.endswith(b"\n"):
        return raw, size
    while raw and not raw.endswith(b"\n"):
        raw = handle.readline(1 << 20)
        size += len(raw)
    return None, size


def count_lines(handle: Any, limit: int) -> int:
    """Non-blank lines of the input, refusing it once there are more than ``limit``."""
    count = 0
    handle.seek(0)
    for raw in handle:
        if raw.strip():
            count += 1
            if count > limit:
                raise BatchRefused(
                    "too_many_lines",
                    f"The input file has more than {limit} request lines, the most one batch may have.",
                )
    return count


def _head_digest(handle: Any) -> str:
    handle.seek(0)
    return hashlib.sha256(handle.read(_HEAD_BYTES)).hexdigest()


Line = tuple[int, bytes | None]


def input_lines(handle: Any, progress: Progress, limit: int) -> Generator[Line]:
    """The lines still to answer: first those read before but left unanswered, then the unread ones.

    Each is marked pending (with its offset) when it is handed out, so a checkpoint taken at any moment knows it.
    """
    for line, offset in sorted(progress.pending.items()):
        handle.seek(offset)
        raw, _ = _read_line(handle, limit)
        yield line, raw
    handle.seek(progress.next_offset)
    while True:
        line, offset = progress.next_line, progress.next_offset
        raw, size = _read_line(handle, limit)
        if size == 0:
            return
        progress.next_line, progress.next_offset = line + 1, offset + size
        if line in progress.skip:
            progress.skip.discard(line)
            continue
        if raw is not None and not raw.strip():
            continue
        progress.pending[line] = offset
        yield line, raw


@dataclass(frozen=True)
class Job:
    """What one request line asks, ready to send."""

    line: int
    custom_id: str | None
    op: str
    body: bytes


class BadLine(Exception):
    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


def parse_line(line: int, raw: bytes | None, request: dict[str, Any]) -> Job:
    """The request on one input line, in the usage guide's form (the body alone) or OpenAI's batch form."""
    if raw is None:
        raise BadLine("line_too_long", f"The line is longer than {request['max_line_bytes']} bytes.")
    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise BadLine("invalid_json", f"The line is not valid JSON: {exc}.") from None
    if not isinstance(item, dict):
        raise BadLine("invalid_line", "The line must be a JSON object.")
    custom_id = item.get("custom_id")
    if custom_id is not None and not isinstance(custom_id, str):
        raise BadLine("invalid_custom_id", "'custom_id' must be a string.")
    endpoint = request.get("endpoint")
    if "body" in item:
        body, url = item["body"], item.get("url")
        if item.get("method", "POST") != "POST":
            raise BadLine("invalid_method", "Only the POST method is supported.", custom_id)
        if url not in OPERATIONS:
            raise BadLine("invalid_url", f"'url' must be one of {', '.join(OPERATIONS)}.", custom_id)
        if endpoint is not None and url != endpoint:
            raise BadLine(
                "url_mismatch", f"The batch's endpoint is {endpoint}, but this line's url is {url}.", custom_id
            )
        op = OPERATIONS[url]
        if not isinstance(body, dict):
            raise BadLine("invalid_body", "'body' must be a JSON object.", custom_id)
    else:
        body = item
        found = [op for name, op in _INPUT_FIELDS if name in body]
        if endpoint is not None:
            op = OPERATIONS[endpoint]
        elif len(found) == 1:
            op = found[0]
        else:
            raise BadLine(
                "unknown_operation", "Give exactly one of 'messages', 'prompt' or 'input' (or an OpenAI batch line)."
            )
        body = {key: value for key, value in body.items() if key != "custom_id"}
    model = body.get("model")
    if model is not None and model not in (request["model"], request["backend_model"]):
        raise BadLine(
            "model_mismatch", f"The line names model '{model}', but the batch runs '{request['model']}'.", custom_id
        )
    if body.get("stream"):
        raise BadLine("stream_not_supported", "Batch requests cannot be streamed.", custom_id)
    body["model"] = request["backend_model"]
    return Job(line, custom_id, op, json.dumps(body, separators=(",", ":")).encode())


# ---------------------------------------------------------------------------------------------- running


class Stop:
    """When a slice stops taking new lines: its time is up, or the batch was cancelled."""

    def __init__(self, folder: _Folder, budget: float) -> None:
        self.folder = folder
        self.deadline = time.monotonic() + budget
        self.cancelled = False
        self._checked = 0.0

    def now(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= _CANCEL_CHECK_SECONDS:
            self._checked = now
            self.cancelled = self.cancelled or self.folder.exists(CANCEL)
        return self.cancelled or now >= self.deadline


def one_line_json(body: bytes) -> bytes | None:
    """``body`` as one line of JSON, or None when it is not a JSON object.

    Servers answer compact JSON, which is written as it came: parsing every answer would cost more CPU than the
    rest of the batch's work per line.
    """
    body = body.strip()
    if not (body.startswith(b"{") and body.endswith(b"}")):
        return None
    if b"\n" in body:
        try:
            return json.dumps(json.loads(body), separators=(",", ":")).encode()
        except ValueError:
            return None
    return body


def _error_of(answer: Answer) -> tuple[str, str, Any]:
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = answer.body[:2000].decode(errors="replace")
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return (
        str(code) if isinstance(code, str) else f"http_{answer.status}",
        str(message or f"The model server answered HTTP {answer.status}."),
        body,
    )


async def _answer_one(http: Http, job: Job, outputs: Outputs, refused: list[int]) -> None:
    delay = 0.5
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            answer = await http.post(job.op, job.body)
        except ServerUnreachable:
            refused[0] += 1
            if refused[0] >= _UNREACHABLE_AFTER:
                raise
            await asyncio.sleep(delay)
            delay *= 2
            continue
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
            if attempt == _ATTEMPTS:
                code = "timeout" if isinstance(exc, TimeoutError) else "upstream_error"
                outputs.fail(job.line, job.custom_id, code, f"The model server did not answer: {exc!r}.")
                return
            await asyncio.sleep(delay)
            delay *= 2
            continue
        refused[0] = 0
        if answer.status == 200:
            body = one_line_json(answer.body)
            if body is None:
                outputs.fail(job.line, job.custom_id, "invalid_response", "The model server's answer is not JSON.")
            else:
                outputs.answer(job.line, job.custom_id, 200, answer.request_id or str(job.line), body)
            return
        if (answer.status >= 500 or answer.status == 429) and attempt < _ATTEMPTS:
            await asyncio.sleep(delay)
            delay *= 2
            continue
        code, message, body = _error_of(answer)
        response = {"status_code": answer.status, "request_id": answer.request_id, "body": body}
        outputs.fail(job.line, job.custom_id, code, message, response)
        return
    raise ServerUnreachable("the model server refuses connections")


async def _take_slot(slots: asyncio.Semaphore, stop: Stop) -> bool:
    """Wait for a free slot; False as soon as the slice should stop instead."""
    if not slots.locked():
        if stop.now():
            return False
        await slots.acquire()
        return True
    while True:
        try:
            async with asyncio.timeout(_CANCEL_CHECK_SECONDS):
                await slots.acquire()
        except TimeoutError:
            if stop.now():
                return False
            continue
        if stop.now():
            slots.release()
            return False
        return True


async def _run_online(
    request: dict[str, Any], lines: Iterator[Line], outputs: Outputs, stop: Stop, base_url: str
) -> None:
    http = Http(base_url, request.get("headers") or {}, float(request["timeout"]))
    slots = asyncio.Semaphore(int(request["concurrency"]))
    running: set[asyncio.Task[None]] = set()
    refused = [0]
    failures: list[BaseException] = []

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            failures.append(error)

    async def watch() -> None:
        # Checkpoints and the cancel flag cannot wait for the next line: the reader may wait long for a slot.
        while True:
            await asyncio.sleep(_CANCEL_CHECK_SECONDS)
            if outputs.checkpoint_due():
                outputs.checkpoint()
            if stop.now() and stop.cancelled:
                # Within seconds: what is still in flight is dropped and stays pending.
                for task in list(running):
                    task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        for line, raw in lines:
            try:
                job = parse_line(line, raw, request)
            except BadLine as bad:
                outputs.fail(line, bad.custom_id, bad.code, bad.message)
                continue
            if failures or not await _take_slot(slots, stop):
                break
            task = asyncio.create_task(_answer_one(http, job, outputs, refused))
            running.add(task)
            task.add_done_callback(finished)
        while running:
            await asyncio.wait(set(running))
    finally:
        watcher.cancel()
        http.close()
    if failures:
        raise failures[0]


def _run_offline(
    request: dict[str, Any], lines: Iterator[Line], outputs: Outputs, stop: Stop, runner: dict[str, Any]
) -> None:
    """Answer the lines with vLLM's offline batch runner, ``chunk_lines`` at a time, instead of a server."""
    chunk: list[Job] = []
    size = int(runner.get("chunk_lines") or 10_000)
    for line, raw in lines:
        try:
            job = parse_line(line, raw, request)
        except BadLine as bad:
            outputs.fail(line, bad.custom_id, bad.code, bad.message)
        else:
            if job.op in _OFFLINE_OPERATIONS:
                chunk.append(job)
            else:
                # vLLM's runner refuses its whole input for one line of an operation it does not serve.
                message = f"The offline batch runner does not serve /v1/{job.op}."
                outputs.fail(line, job.custom_id, "operation_not_supported", message)
        if len(chunk) >= size:
            _offline_chunk(request, chunk, outputs, stop, runner)
            chunk = []
            outputs.checkpoint()
            if stop.now():
                return
    if chunk:
        _offline_chunk(request, chunk, outputs, stop, runner)


def _offline_chunk(
    request: dict[str, Any], chunk: list[Job], outputs: Outputs, stop: Stop, runner: dict[str, Any]
) -> None:
    folder = outputs.folder
    source, target = ".runner-input.jsonl", ".runner-output.jsonl"
    by_id = {str(job.line): job for job in chunk}
    lines = [
        b'{"custom_id":"%d","method":"POST","url":"/v1/%s","body":%s}\n' % (job.line, job.op.encode(), job.body)
        for job in chunk
    ]
    folder.replace(source, b"".join(lines))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target, dir_fd=folder.fd)
    values = {
        "python": sys.executable,
        "input": str(folder.path / source),
        "output": str(folder.path / target),
        "model": request["backend_model"],
    }
    command = [str(part).format(**values) for part in runner["command"]]
    log = folder.open_file("runner.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(runner.get("env") or {})},
            cwd=folder.path,
            start_new_session=True,
        )
    finally:
        os.close(log)
    while process.poll() is None:
        time.sleep(_CANCEL_CHECK_SECONDS)
        if stop.now() and stop.cancelled:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return
    if process.returncode != 0:
        raise ServerUnreachable(f"the offline batch runner exited with status {process.returncode}; see runner.log")
    for raw in (folder.read(target) or b"").splitlines():
        try:
            item = json.loads(raw)
            job = by_id.pop(str(item["custom_id"]))
        except (ValueError, KeyError, TypeError):
            continue
        response = item.get("response") or {}
        if item.get("error") is None and response.get("status_code", 200) == 200 and response.get("body"):
            body = json.dumps(response["body"], separators=(",", ":")).encode()
            outputs.answer(job.line, job.custom_id, 200, str(response.get("request_id") or job.line), body)
        else:
            error = item.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            outputs.fail(
                job.line, job.custom_id, "runner_error", str(message or "the runner reported an error"), response
            )
    for job in by_id.values():
        outputs.fail(job.line, job.custom_id, "runner_no_answer", "The offline batch runner gave no answer for it.")
    for name in (source, target):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder.fd)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where the worker has it: the batch's own CPU per request is its throughput."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _server_url(request: dict[str, Any]) -> str:
    if request.get("base_url"):
        return str(request["base_url"])
    spec = node.LaunchSpec.from_settings(request["model_server"], str(request["backend_model"]))
    try:
        return node.ensure_server(spec)
    except ModelServerFailed as exc:
        raise ServerUnreachable(f"the model server did not start: {exc}") from None


def _summary(progress: Progress, state: str) -> dict[str, Any]:
    return {
        "ok": True,
        "state": state,
        "total": progress.total,
        "completed": progress.completed,
        "failed": progress.failed,
        "errors": progress.errors,
    }


def _load(folder: _Folder, batch_id: str) -> Progress:
    data = folder.read(PROGRESS)
    if data is None:
        return Progress()
    try:
        record = json.loads(data)
        if record.get("batch_id") != batch_id:
            raise BatchRefused("output_in_use", f"{folder.path} holds another batch's results.")
        return Progress.from_json(data)
    except (ValueError, KeyError, TypeError):
        raise BatchRefused("output_damaged", f"{folder.path / PROGRESS} cannot be read.") from None


def _open_input(request: dict[str, Any], roots: list[str]) -> Any:
    path = checked_path(str(request["input"]), roots, "input file", must_exist=True)
    if not path.is_file():
        raise BatchRefused("invalid_path", f"The input file '{request['input']}' is not a regular file.")
    try:
        handle = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by run_batch
    except OSError as exc:
        raise BatchRefused("file_not_readable", f"The input file cannot be read: {exc.strerror}.") from None
    try:
        _opened_inside(handle.fileno(), roots, "input file")
    except BatchRefused:
        handle.close()
        raise
    return handle


def _slice(request: dict[str, Any], folder: _Folder, progress: Progress) -> dict[str, Any]:
    roots = [str(root) for root in request["allowed_roots"]]
    with _open_input(request, roots) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = _head_digest(handle)
        if progress.total is None:
            progress.total = count_lines(handle, int(request["max_lines"]))
            progress.input_size, progress.input_head = size, head
        elif (size, head) != (progress.input_size, progress.input_head):
            raise BatchRefused("input_changed", "The input file changed while the batch ran.")
        outputs = Outputs(folder, str(request["batch_id"]), progress)
        try:
            stop = Stop(folder, float(request["time_budget"]))
            lines = input_lines(handle, progress, int(request["max_line_bytes"]))
            try:
                if request.get("offline_runner"):
                    _run_offline(request, lines, outputs, stop, request["offline_runner"])
                else:
                    base_url = _server_url(request)
                    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                        runner.run(_run_online(request, lines, outputs, stop, base_url))
            finally:
                lines.close()
                finished = not progress.pending and progress.answered >= (progress.total or 0)
                if stop.cancelled and not finished:
                    progress.state = "cancelled"
                elif finished:
                    progress.state = "completed"
                outputs.checkpoint()
        finally:
            outputs.close()
    return _summary(progress, progress.state)


def run_batch(request: dict[str, Any]) -> dict[str, Any]:
    """Work on the batch for about ``time_budget`` seconds, resuming where any earlier run stopped; see the module."""
    roots = [str(root) for root in request["allowed_roots"]]
    batch_id = str(request["batch_id"])
    try:
        folder = _Folder.open(str(request["output"]), roots)
    except BatchRefused as refused:
        return {"ok": True, "state": "failed", "errors": [{"code": refused.code, "message": refused.message}]}
    try:
        lock = folder.open_file(LOCK, os.O_RDWR | os.O_CREAT)
        with locks.held(lock, time.monotonic() + float(request.get("lock_wait", 30.0))) as owned:
            if not owned:
                return {"ok": True, "state": "busy", "errors": []}
            try:
                progress = _load(folder, batch_id)
            except BatchRefused as refused:
                return {"ok": True, "state": "failed", "errors": [{"code": refused.code, "message": refused.message}]}
            if progress.state in ("completed", "failed"):
                return _summary(progress, progress.state)
            try:
                return _slice(request, folder, progress)
            except BatchRefused as refused:
                progress.state = "failed"
                progress.errors = [{"code": refused.code, "message": refused.message}]
                with contextlib.suppress(OSError, BatchRefused):
                    folder.replace(PROGRESS, progress.to_json(batch_id))
                return _summary(progress, "failed")
            except ServerUnreachable as exc:
                if request.get("model_server"):
                    node.forget(node.LaunchSpec.from_settings(request["model_server"], str(request["backend_model"])))
                return {"ok": False, "error": {"kind": "upstream", "message": str(exc)}}
    finally:
        folder.close()


def read_progress(folder: str | Path) -> dict[str, Any] | None:
    """The progress record of the batch whose folder is ``folder``, or None before its first checkpoint."""
    try:
        fd = os.open(Path(folder) / PROGRESS, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        try:
            record = json.loads(handle.read())
        except ValueError:
            return None
    return record if isinstance(record, dict) else None


def request_cancel(folder: str | Path) -> None:
    """Ask whoever runs the batch whose folder is ``folder`` to stop; a batch not yet started stops at once."""
    fd = os.open(Path(folder) / CANCEL, os.O_WRONLY | os.O_CREAT | _NOFOLLOW, 0o640)
    os.close(fd)


def main() -> int:
    """``python -m compute_functions.batch``: one ``run_batch``, its request as JSON on stdin, its result on stdout."""
    request = json.load(sys.stdin)
    result = run_batch(request)
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0

