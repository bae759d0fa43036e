"""The status page, and what it reads beside the routes a script would: each model's last hour and expected wait.

``GET /resource_server/`` and ``GET /resource_server/status`` answer a browser (a request that prefers HTML) with
the page, and anyone else with the clusters' status as JSON. The page is one file of plain HTML, CSS and JavaScript
shipped in the package (no CDN: it works offline); it asks for a token and reads the JSON routes with it, so it
shows exactly what the API shows that token.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.api import catalog
from gateway.api.responses import api_handler, authenticate, json_response, read_json
from gateway.errors import InvalidRequest, NotFound
from gateway.federation.registry import Endpoint
from gateway.runtime import Runtime

_PAGE = "status_page.html"
# Which state of a model's endpoints says most about when it can answer, best first.
_READINESS = ("hot", "starting", "queued", "cold", "unknown", "offline", "maintenance")


def wants_html(request: Request) -> bool:
    """Whether the client prefers HTML: browsers ask for text/html first; scripts and curl send */* or JSON."""
    accept = request.headers.get("accept", "")
    html = accept.find("text/html")
    json = accept.find("application/json")
    return html >= 0 and (json < 0 or html < json)


async def status(request: Request) -> Response:
    """The page for a browser, each cluster's status as JSON for everyone else."""
    if not wants_html(request):
        return await catalog.cluster_status(request)
    runtime: Runtime = request.app.state.runtime
    page = resources.files("gateway.api").joinpath(_PAGE).read_text()
    # Public settings only (the native app's id, the scope's name): what a login URL shows anyway.
    login = runtime.authenticator.browser_login()
    page = page.replace("{{browser_login}}", orjson.dumps(login).decode().replace("</", "<\\/"))
    # The page holds bearer tokens: no other site may frame it, and it loads nothing from anywhere else.
    headers = {
        "content-security-policy": "default-src 'self'; script-src 'unsafe-inline' 'self'; "
        "style-src 'unsafe-inline' 'self'; frame-ancestors 'none'",
        "x-frame-options": "DENY",
        "cache-control": "no-store",
    }
    return Response(page, media_type="text/html", headers=headers)


def _wait(endpoints: list[Endpoint], model: str, wall: float) -> dict[str, Any]:
    """Where ``model`` is hot and, when it is hot nowhere, what a request would wait for."""
    states = {endpoint.id: endpoint.state(wall, model) for endpoint in endpoints}
    best = min(states.values(), key=_READINESS.index) if states else "unknown"
    expected: float | None = None
    if best == "hot":
        expected = 0.0
    elif best == "queued":
        starts = [
            endpoint.availability.estimated_start
            for endpoint in endpoints
            if states[endpoint.id] == "queued" and endpoint.availability.estimated_start
        ]
        expected = max(min(starts) - wall, 0.0) if starts else None
    return {
        "state": best,
        "hot_on": sorted(name for name, state in states.items() if state == "hot"),
        "expected_wait_seconds": expected,
    }


@api_handler
async def activity(request: Request) -> Response:
    """``GET /resource_server/activity``: for each model the caller may use, where it is hot, the expected wait,
    and its last hour a minute at a time (requests per second, error rate, time to first token)."""
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    wall = time.time()
    serving: dict[str, list[Endpoint]] = {}
    for endpoint in runtime.registry.visible_to(identity):
        for model in endpoint.models:
            serving.setdefault(model, []).append(endpoint)
    recent = runtime.usage.recent if runtime.usage is not None else None
    data = []
    for model, endpoints in sorted(serving.items()):
        entry: dict[str, Any] = {"model": model, "endpoints": [endpoint.id for endpoint in endpoints]}
        entry.update(_wait(endpoints, model, wall))
        entry["simulated"] = any(endpoint.simulated for endpoint in endpoints)
        entry["minutes"] = recent.series(model, wall) if recent is not None else None
        data.append(entry)
    return json_response({"object": "list", "minute_seconds": 60, "data": data})


@api_handler
async def sign_in(request: Request) -> Response:
    """``POST /resource_server/login``: the page's authorization code (``code``, ``code_verifier``,
    ``redirect_uri``) redeemed for an access token, on gateways whose auth has a browser login."""
    runtime: Runtime = request.app.state.runtime
    if runtime.authenticator.browser_login() is None:
        raise NotFound("This gateway has no browser login: sign in with a token.", code="route_not_found")
    body = await read_json(request, 16 * 1024, runtime.config.server.max_json_depth)
    fields = {}
    for name in ("code", "code_verifier", "redirect_uri"):
        value = body.get(name) if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"'{name}' is required.", param=name, code="missing_required_parameter")
        fields[name] = value
    token = await runtime.authenticator.redeem_code(fields["code"], fields["code_verifier"], fields["redirect_uri"])
    return json_response(token)
