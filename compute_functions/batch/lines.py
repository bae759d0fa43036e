"""The batch's input: its request lines read once each, in order or again after a crash, and checked one by one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from compute_functions.batch.folder import BatchRefused
from compute_functions.batch.progress import Progress

OPERATIONS = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
# Where a request-line's operation comes from when the batch does not name one: the field that carries the input.
_INPUT_FIELDS = (("messages", "chat/completions"), ("prompt", "completions"), ("input", "embeddings"))
_HEAD_BYTES = 64 * 1024


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


def head_digest(handle: Any) -> str:
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
