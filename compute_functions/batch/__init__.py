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

Its modules: ``folder`` (the paths and the folder), ``lines`` (the input), ``progress`` (the progress record, the
output files, when a slice stops), ``online`` (answers through the model server's API) and ``offline`` (answers
through vLLM's offline batch runner).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from backend_http.client import ServerUnreachable
from compute_functions import locks, node
from compute_functions.batch.folder import (
    CANCEL,
    ERRORS,
    LOCK,
    NOFOLLOW,
    PROGRESS,
    RESULTS,
    BatchRefused,
    Folder,
    checked_path,
    opened_inside,
)
from compute_functions.batch.lines import count_lines, head_digest, input_lines
from compute_functions.batch.offline import run_offline
from compute_functions.batch.online import run_online
from compute_functions.batch.progress import Outputs, Progress, Stop
from compute_functions.model_server import ModelServerFailed

__all__ = [
    "ERRORS",
    "LOCK",
    "RESULTS",
    "BatchRefused",
    "checked_path",
    "count_lines",
    "main",
    "read_progress",
    "request_cancel",
    "run_batch",
]


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


def _load(folder: Folder, batch_id: str) -> Progress:
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
        opened_inside(handle.fileno(), roots, "input file")
    except BatchRefused:
        handle.close()
        raise
    return handle


def _slice(request: dict[str, Any], folder: Folder, progress: Progress) -> dict[str, Any]:
    roots = [str(root) for root in request["allowed_roots"]]
    with _open_input(request, roots) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = head_digest(handle)
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
                    run_offline(request, lines, outputs, stop, request["offline_runner"])
                else:
                    run_online(request, lines, outputs, stop, _server_url(request))
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
    """Work on the batch for about ``time_budget`` seconds, resuming where any earlier run stopped; see the package."""
    roots = [str(root) for root in request["allowed_roots"]]
    batch_id = str(request["batch_id"])
    try:
        folder = Folder.open(str(request["output"]), roots)
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
        fd = os.open(Path(folder) / PROGRESS, os.O_RDONLY | NOFOLLOW)
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
    fd = os.open(Path(folder) / CANCEL, os.O_WRONLY | os.O_CREAT | NOFOLLOW, 0o640)
    os.close(fd)


def main() -> int:
    """``python -m compute_functions.batch``: one ``run_batch``, its request as JSON on stdin, its result on stdout."""
    request = json.load(sys.stdin)
    result = run_batch(request)
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0
