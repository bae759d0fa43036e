"""What the platform watching the gateway asks: is it ready for traffic, and its Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Awaitable
from ipaddress import ip_address

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.responses import api_handler, json_response
from gateway.config import MetricsSettings
from gateway.errors import AuthenticationFailed, NotFound, PermissionDenied
from gateway.runtime import Runtime
from gateway.storage.database import DatabaseUnavailable

_CHECK_SECONDS = 2.0


async def _database(runtime: Runtime) -> str | None:
    try:
        await runtime.database.ping()
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


async def _bounded(check: Awaitable[str | None]) -> str:
    try:
        problem = await asyncio.wait_for(check, _CHECK_SECONDS)
    except TimeoutError:
        return "no answer in time"
    return problem or "ok"


@api_handler
async def ready(request: Request) -> Response:
    """200 when the usage database, every transport and the rate limiter can work; 503 naming what cannot."""
    runtime: Runtime = request.app.state.runtime
    checks = {"limits": runtime.limiter.check()}
    if runtime.config.database.usage_log:
        checks["database"] = _database(runtime)
    for transport, dispatcher in runtime.dispatchers.items():
        checks[f"transport {transport}"] = dispatcher.check()
    results = await asyncio.gather(*(_bounded(check) for check in checks.values()))
    verdicts = dict(zip(checks, results, strict=True))
    ready = all(verdict == "ok" for verdict in verdicts.values())
    body = {"status": "ready" if ready else "not ready", "checks": verdicts}
    return json_response(body, status=200 if ready else 503)


def _may_scrape(request: Request, settings: MetricsSettings) -> bool:
    expected = os.environ.get(settings.token_env, "") if settings.token_env else ""
    given = request.headers.get("authorization", "")
    if expected and given.lower().startswith("bearer "):
        return hmac.compare_digest(given[7:].strip().encode(), expected.encode())
    client = request.client
    try:
        address = ip_address(client.host) if client is not None else None
    except ValueError:
        address = None
    return address is not None and any(address in network for network in settings.allow_networks)


@api_handler
async def metrics(request: Request) -> Response:
    """The Prometheus text format, for callers from the allowed networks or with the metrics token."""
    runtime: Runtime = request.app.state.runtime
    settings = runtime.config.metrics
    if not settings.enabled:
        raise NotFound("Metrics are turned off on this gateway.", code="route_not_found")
    if not _may_scrape(request, settings):
        if settings.token_env and request.headers.get("authorization"):
            raise AuthenticationFailed("The metrics token is not valid.")
        raise PermissionDenied("Metrics are served only to the monitoring network.", code="metrics_forbidden")
    assert runtime.metrics is not None and runtime.ledger is not None
    await runtime.ledger.sync()
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
