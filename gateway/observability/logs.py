"""Structured logs: JSON lines for the gateway's own records and for its access log.

Every line is one JSON object with ``ts``, ``level``, ``logger`` and ``message``, plus the
``request_id`` when it was written while serving a request. Bearer tokens never reach a line:
the access log holds no headers, and the formatter masks anything that looks like one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import orjson

from gateway.accounting.record import FinishedRequest
from gateway.config import LoggingSettings

# The ASGI scope of the request being served, so that any record logged while serving it carries its id.
current_scope: ContextVar[MutableMapping[str, Any] | None] = ContextVar("current_scope", default=None)

_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",]+")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", text) if "earer" in text else text


class _Clock:
    """ISO 8601 UTC timestamps with milliseconds; the part down to the second is made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((when - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._clock(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        scope = current_scope.get()
        if scope is not None and "request_id" in scope:
            entry["request_id"] = scope["request_id"]
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure_logging(settings: LoggingSettings, level: str) -> None:
    """Send the gateway's records (and uvicorn's) to stderr, as JSON lines unless the operator chose text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.json_lines else _RedactingFormatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Records the gateway never shows, not worth their cost on every log call.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class AccessLog:
    """One line per HTTP request, at its end, with what the gateway learned about it.

    Lines are buffered and written to ``fd`` by ``flush`` (the usage writer calls it after each
    batch), so a request costs a dict and a serialisation, not a system call.
    """

    def __init__(self, settings: LoggingSettings, fd: int = 2) -> None:
        self.json_lines = settings.json_lines
        self.log_prompts = settings.log_prompts
        self.fd = fd
        self._buffer: list[str] = []
        self._clock = _Clock()

    def write(self, record: FinishedRequest) -> None:
        """Log one finished request; every line has the same keys, null where a fact does not apply."""
        ttft = record.ttft
        # One dict literal: building it key by key costs more than the serialisation.
        entry = {
            "ts": self._clock(record.started_at + record.duration),
            "level": "info",
            "logger": "gateway.access",
            "message": f"{record.method} {record.path} {record.status}",
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "status": record.status,
            "duration_ms": int(record.duration * 1_000_000) / 1000,
            "client": record.client,
            "user": record.user,
            "model": record.model,
            "cluster": record.cluster,
            "framework": record.framework,
            "transport": record.transport,
            "stream": record.stream,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "ttft_ms": None if ttft is None else int(ttft * 1_000_000) / 1000,
            "error_code": record.error_code,
        }
        if self.log_prompts and record.prompt is not None:
            entry["prompt"] = record.prompt
        if self.json_lines:
            # Decoded at once: holding on to orjson's own bytes objects costs several times the serialisation.
            line = orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE).decode()
        else:
            fields = " ".join(
                f"{key}={value}"
                for key, value in entry.items()
                if value is not None and key not in ("ts", "level", "logger", "message")
            )
            line = f"{entry['ts']} INFO gateway.access: {entry['message']} {fields}\n"
        buffer = self._buffer
        buffer.append(line)
        if len(buffer) >= 512:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = "".join(self._buffer).encode()
        self._buffer.clear()
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.fd, data) :]
