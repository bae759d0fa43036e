"""What the caller may use: the model list, the endpoint list, and the gateway's own health."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway import __version__
from gateway.api.responses import api_handler, authenticate, json_response
from gateway.errors import PermissionDenied
from gateway.federation.registry import Endpoint
from gateway.runtime import Runtime

_STARTED = int(time.time())


@api_handler
async def list_models(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    owners: dict[str, list[Endpoint]] = {}
    for endpoint in runtime.registry.visible_to(identity):
        for model in endpoint.models:
            owners.setdefault(model, []).append(endpoint)
    data = [
        {
            "id": model,
            "object": "model",
            "created": _STARTED,
            "owned_by": ",".join(endpoint.id for endpoint in endpoints),
            "endpoints": [endpoint.id for endpoint in endpoints],
            # The APIs some endpoint of it answers (``chat/completions``, ``responses``, ``messages``, ...).
            "apis": sorted({api for endpoint in endpoints for api in endpoint.served_apis}),
            # Some endpoint of it runs the simulator: its answers (marked "simulated" too) are synthetic words.
            "simulated": any(endpoint.simulated for endpoint in endpoints),
        }
        for model, endpoints in sorted(owners.items())
    ]
    return json_response({"object": "list", "data": data})


def _iso(epoch: float | None) -> str | None:
    if not epoch:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _endpoint_view(endpoint: Endpoint, wall: float, now: float) -> dict[str, Any]:
    seen = endpoint.availability
    return {
        "id": endpoint.id,
        "cluster": endpoint.cluster,
        "framework": endpoint.framework,
        "models": list(endpoint.models),
        "transport": endpoint.transport,
        "route": endpoint.route,
        "apis": endpoint.served_apis,
        "state": endpoint.state(wall),
        "detail": endpoint.maintenance if endpoint.maintenance is not None else seen.detail,
        "observed_at": _iso(seen.observed_at),
        "estimated_start": _iso(seen.estimated_start),
        "load": {"running": seen.running, "waiting": seen.waiting, "gateway_in_flight": endpoint.in_flight},
        "breaker": "closed" if endpoint.is_up(now) else "open",
        "simulated": endpoint.simulated,
    }


@api_handler
async def list_endpoints(request: Request) -> Response:
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    wall, now = time.time(), time.monotonic()
    views = [_endpoint_view(endpoint, wall, now) for endpoint in runtime.registry.visible_to(identity)]
    return json_response({"object": "list", "data": views})


async def _cluster_endpoints(request: Request) -> list[Endpoint]:
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    on_cluster = runtime.registry.on_cluster(request.path_params["cluster"])
    allowed = [endpoint for endpoint in on_cluster if endpoint.allows(identity)]
    if not allowed:
        raise PermissionDenied(f"You are not allowed to use cluster '{request.path_params['cluster']}'.")
    return allowed


@api_handler
async def cluster_models(request: Request) -> Response:
    wall = time.time()
    data = [
        {
            "id": model,
            "object": "model",
            "created": _STARTED,
            "owned_by": endpoint.id,
            "framework": endpoint.framework,
            "state": endpoint.state(wall, model),
            "route": endpoint.route,
            "apis": endpoint.served_apis,
            "simulated": endpoint.simulated,
        }
        for endpoint in await _cluster_endpoints(request)
        for model in endpoint.models
    ]
    return json_response({"object": "list", "data": data})


_JOB_STATES = {"hot": "running", "starting": "starting", "queued": "queued"}


@api_handler
async def cluster_jobs(request: Request) -> Response:
    """The cluster's model jobs: the scheduler's entries where the transport reports them, otherwise
    one entry per model of each serving endpoint."""
    wall = time.time()
    jobs: dict[str, list[dict[str, Any]]] = {"running": [], "starting": [], "queued": []}
    for endpoint in await _cluster_endpoints(request):
        seen = endpoint.availability
        if seen.jobs:
            for job in seen.jobs:
                state = str(job.get("state", "running"))
                jobs.setdefault(state, []).append({"endpoint": endpoint.id, **job})
            continue
        bucket = _JOB_STATES.get(endpoint.state(wall))
        if bucket is not None:
            for model in endpoint.models:
                jobs[bucket].append(
                    {
                        "endpoint": endpoint.id,
                        "model": model,
                        "framework": endpoint.framework,
                        "job_id": None,
                        "estimated_start": _iso(seen.estimated_start),
                        "observed_at": _iso(seen.observed_at),
                    }
                )
    return json_response({"cluster": request.path_params["cluster"], **jobs})


@api_handler
async def cluster_status(request: Request) -> Response:
    """Each cluster up, degraded (some endpoints serve), down, or under maintenance."""
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    wall = time.time()
    clusters: dict[str, dict[str, Any]] = {}
    for endpoint in runtime.registry.visible_to(identity):
        entry = clusters.setdefault(endpoint.cluster, {"endpoints": 0, "serving": 0, "maintenance": None})
        entry["endpoints"] += 1
        state = endpoint.state(wall)
        if state == "maintenance":
            entry["maintenance"] = endpoint.maintenance
        elif state not in ("offline", "unknown"):
            entry["serving"] += 1
    for entry in clusters.values():
        if entry["maintenance"] is not None:
            entry["status"] = "maintenance"
        elif entry["serving"] == entry["endpoints"]:
            entry["status"] = "up"
        else:
            entry["status"] = "degraded" if entry["serving"] else "down"
    return json_response({"clusters": clusters})


@api_handler
async def health(request: Request) -> Response:
    return json_response({"status": "ok", "version": __version__})
