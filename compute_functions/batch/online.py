"""Answering a batch's lines through a model server's HTTP API, many at once, each tried again on a server failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

from backend_http.client import Answer, Http, ServerUnreachable
from compute_functions import event_loop
from compute_functions.batch.lines import BadLine, Job, Line, parse_line
from compute_functions.batch.progress import CANCEL_CHECK_SECONDS, Outputs, Stop

# A request that failed on the server's side (5xx, 429, timeout) is tried this many times in all.
_ATTEMPTS = 3
# Refused connections in a row before the model server counts as gone and the slice stops.
_UNREACHABLE_AFTER = 5


def run_online(request: dict[str, Any], lines: Iterator[Line], outputs: Outputs, stop: Stop, base_url: str) -> None:
    """Answer ``lines`` with the server at ``base_url`` until they run out or ``stop`` says so.

    Raises ``ServerUnreachable`` when the server refuses connections for good.
    """
    event_loop.run(_answer_lines(request, lines, outputs, stop, base_url))


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
            async with asyncio.timeout(CANCEL_CHECK_SECONDS):
                await slots.acquire()
        except TimeoutError:
            if stop.now():
                return False
            continue
        if stop.now():
            slots.release()
            return False
        return True


async def _answer_lines(
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
            await asyncio.sleep(CANCEL_CHECK_SECONDS)
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
