"""Answering a batch's lines with vLLM's offline batch runner, a chunk at a time, where no server is wanted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from backend_http.client import ServerUnreachable
from compute_functions.batch.lines import BadLine, Job, Line, parse_line
from compute_functions.batch.progress import CANCEL_CHECK_SECONDS, Outputs, Stop

_OFFLINE_OPERATIONS = frozenset({"chat/completions", "embeddings"})


def run_offline(
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
        time.sleep(CANCEL_CHECK_SECONDS)
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
