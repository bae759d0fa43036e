"""Usage reports: everyone's, for the gateway's administrators only, and each user's own."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.accounting.report import DEFAULT_BY, as_csv, parse_day, parse_dimensions
from gateway.api.responses import api_handler, authenticate, json_response
from gateway.auth.base import Identity
from gateway.config import AdminSettings
from gateway.errors import InvalidRequest, PermissionDenied, ServiceUnavailable
from gateway.runtime import Runtime
from gateway.storage.database import DatabaseUnavailable


def is_admin(identity: Identity, settings: AdminSettings) -> bool:
    return identity.username in settings.users or not identity.groups.isdisjoint(settings.groups)


async def _report(request: Request, default_by: str, user: str | None) -> Response:
    """The report the query asks for (``by``, ``since``, ``until``, ``format``), of ``user``'s rows when given."""
    runtime: Runtime = request.app.state.runtime
    query = request.query_params
    try:
        by = parse_dimensions(query.get("by", default_by))
        since = parse_day(query["since"]) if query.get("since") else None
        until = parse_day(query["until"]) if query.get("until") else None
    except ValueError as exc:
        raise InvalidRequest(f"{exc}.", code="invalid_value") from None
    form = query.get("format", "json")
    if form not in ("json", "csv"):
        raise InvalidRequest("'format' must be json or csv.", code="invalid_value", param="format")
    rows = await _rows(runtime, by, since, until, user)
    if form == "csv":
        return Response(as_csv(rows, by), media_type="text/csv")
    return json_response({"object": "list", "by": by, "data": rows})


async def _rows(
    runtime: Runtime, by: list[str], since: datetime | None, until: datetime | None, user: str | None
) -> list[dict[str, Any]]:
    try:
        return await runtime.database.usage_report(by, since, until, user=user)
    except DatabaseUnavailable as exc:
        raise ServiceUnavailable(f"The usage database cannot be read now: {exc}", code="database_unavailable") from None


@api_handler
async def usage(request: Request) -> Response:
    """``GET /resource_server/admin/usage?by=user,model,day&since=YYYY-MM-DD&until=YYYY-MM-DD&format=json|csv``."""
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    if not is_admin(identity, runtime.config.admin):
        raise PermissionDenied("Only the gateway's administrators may read the usage report.", code="admin_only")
    return await _report(request, DEFAULT_BY, None)


@api_handler
async def own_usage(request: Request) -> Response:
    """``GET /resource_server/usage?by=model,day&since=...``: the caller's own requests and tokens."""
    identity = await authenticate(request)
    return await _report(request, "model,day", identity.username)
