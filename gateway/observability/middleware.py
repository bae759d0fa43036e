"""The ASGI middleware that watches every HTTP request from arrival to last byte.

It makes the request's ``RequestRecord`` (the handlers note the status, error code and usage in it), and when
the response is over (finished, failed or abandoned by the client) hands the record to the ledger, which passes it
on to be counted, logged and recorded. Being outermost to the routes, it sees streamed responses end, which a
handler cannot. It does not wrap ``send``: an
extra coroutine for every message sent costs more than everything else it does.
"""

from __future__ import annotations

import logging
from time import perf_counter

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.accounting.record import SCOPE_KEY, RequestRecord, request_id, row_of
from gateway.observability.ledger import RequestLedger
from gateway.observability.logs import current_scope
from gateway.observability.metrics import GatewayMetrics

log = logging.getLogger("gateway.observability")


class ObservingMiddleware:
    def __init__(self, app: ASGIApp, ledger: RequestLedger, metrics: GatewayMetrics | None) -> None:
        self.app = app
        self.ledger = ledger
        self.metrics = metrics

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
        try:
            await self.app(scope, receive, send)
        finally:
            # Inline rather than in a method: this runs for every request.
            try:
                record.duration = perf_counter() - record.started
                if metrics is not None:
                    metrics.in_flight -= 1
                if not record.status:
                    # The app raised before answering; the error middleware outside this one answers 500.
                    record.status = 500
                route = scope.get("route")
                record.route = route.path if route is not None else "unmatched"
                record.request_id = scope.get("request_id") or request_id(Request(scope))
                self.ledger.add(row_of(record))
            except Exception:
                log.exception("could not account for %s %s", record.method, record.path)
