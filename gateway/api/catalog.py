"""What the caller may use: the model list, the endpoint list, and the gateway's own health."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.api.responses import api_handler, authenticate, json_response
from gateway.runtime import Runtime

_STARTED = int(time.time())


@api_handler
async def list_models(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    owners: dict[str, list[str]] = {}
    for endpoint in runtime.registry.visible_to(identity):
        for model in endpoint.models:
            owners.setdefault(model, []).append(endpoint.id)
    data = [
        {"id": model, "object": "model", "created": _STARTED, "owned_by": ",".join(endpoints), "endpoints": endpoints}
        for model, endpoints in sorted(owners.items())
    ]
    return json_response({"object": "list", "data": data})


@api_handler
async def list_endpoints(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    now = time.monotonic()
    endpoints = [
        {
            "id": endpoint.id,
            "cluster": endpoint.cluster,
            "framework": endpoint.framework,
            "models": list(endpoint.models),
            "transport": endpoint.transport,
            "route": endpoint.route,
            "state": "online" if endpoint.is_up(now) else "unreachable",
        }
        for endpoint in runtime.registry.visible_to(identity)
    ]
    return json_response({"object": "list", "data": endpoints})


@api_handler
async def health(request: Request) -> Response:
    return json_response({"status": "ok", "version": __version__})
