"""The ASGI middleware that watches every HTTP request from arrival to last byte.

It makes the request's ``RequestRecord``, notes the status and error code of the response as it is
sent, and when the response is over (finished, failed or abandoned by the client) settles the
request with the rate limiter and hands the record to the ledger, which counts, logs and records it.
Being outermost to the routes, it sees streamed responses end, which a handler cannot.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.accounting.record import SCOPE_KEY, RequestRecord
from gateway.api.responses import request_id
from gateway.observability.logs import current_scope

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger("gateway.observability")


class ObservingMiddleware:
    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.metrics = runtime.ledger.metrics

    @staticmethod
    def needed(runtime: Runtime) -> bool:
        """Whether anything reads the records: with all of it turned off, requests skip the middleware."""
        ledger = runtime.ledger
        return (
            ledger.metrics is not None
            or ledger.usage is not None
            or ledger.access_log is not None
            or runtime.limiter.enabled
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(scope["method"], scope["path"], client[0] if client else None)
        scope[SCOPE_KEY] = record
        current_scope.set(scope)
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight += 1
        failed = streaming = False

        async def observed_send(message: Message) -> None:
            nonlocal failed, streaming
            kind = message["type"]
            if kind == "http.response.start":
                record.status = status = message["status"]
                failed = status >= 400
                if record.stream and status == 200 and metrics is not None:
                    streaming = True
                    metrics.streams_open += 1
            elif kind == "http.response.body":
                if failed:
                    failed = False
                    if record.error_code is None:
                        record.error_code = _error_code(message.get("body", b""))
                if not message.get("more_body", False) and record.reservation is not None:
                    # Give the limits back before the last byte leaves: a client that sends its next request
                    # as soon as this answer ends must not find its own finished request still counted.
                    self.runtime.limiter.settle(record.reservation, _used_tokens(record))
                    record.reservation = None
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            try:
                self._finish(scope, record, streaming)
            except Exception:
                log.exception("could not account for %s %s", record.method, record.path)

    def _finish(self, scope: Scope, record: RequestRecord, streaming: bool) -> None:
        runtime = self.runtime
        record.duration = perf_counter() - record.started
        if not record.status:
            # The app raised before answering; the error middleware outside this one answers 500.
            record.status = 500
        record.request_id = scope.get("request_id") or request_id(Request(scope))
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight -= 1
            if streaming:
                metrics.stream_ended(record.error_code or "completed")
        if record.reservation is not None:
            runtime.limiter.settle(record.reservation, _used_tokens(record))
        route = scope.get("route")
        runtime.ledger.add(record, route.path if route is not None else "unmatched")


def _used_tokens(record: RequestRecord) -> int | None:
    if record.prompt_tokens is not None or record.completion_tokens is not None:
        return record.tokens
    # Refused before any work: give everything back. Otherwise the backend did work it did not report: keep it.
    return 0 if record.status >= 400 else None


def _error_code(body: bytes) -> str | None:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None
