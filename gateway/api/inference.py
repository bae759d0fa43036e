"""Chat completions, completions and embeddings: validate, pick an endpoint, forward, relay the answer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.api.responses import api_handler, authenticate, json_response, read_json, request_id
from gateway.api.validation import validate
from gateway.dispatch.base import (
    BackendError,
    BackendFailure,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)
from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    sse_error_event,
)
from gateway.federation.registry import Endpoint
from gateway.runtime import Runtime

log = logging.getLogger("gateway.api")

_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _upstream_message(body: bytes) -> tuple[str, str | None]:
    """The message and code of a backend's error body, whatever OpenAI-like shape it has."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode(errors="replace").strip() or "(empty body)", None
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or orjson.dumps(error).decode()
        code = error.get("code")
        return str(message), code if isinstance(code, str) else None
    return str(error), None


def client_error(failure: BackendFailure, model: str) -> GatewayError:
    """The error the client sees for a backend failure (after failover had its chance)."""
    if isinstance(failure, BackendTimeout):
        return UpstreamTimeout(f"The backend for model '{model}' did not answer in time.")
    if isinstance(failure, BackendProtocolError):
        return UpstreamProtocolError(f"The backend for model '{model}' sent an invalid answer: {failure.detail}.")
    if isinstance(failure, BackendError):
        message, code = _upstream_message(failure.body)
        if failure.status == 503:
            return ServiceUnavailable(
                f"The backend for model '{model}' is unavailable: {message}", code="backend_unavailable"
            )
        if failure.status >= 500:
            return UpstreamProtocolError(
                f"The backend for model '{model}' failed (HTTP {failure.status}): {message}", code="upstream_error"
            )
        return UpstreamError(message, status=failure.status, code=code or "upstream_error")
    return ServiceUnavailable(
        f"No backend for model '{model}' could be reached; try again shortly.",
        code="backend_unavailable",
        headers={"retry-after": "5"},
    )


def _retryable(failure: BackendFailure) -> bool:
    return isinstance(failure, BackendUnavailable) or (isinstance(failure, BackendError) and failure.status == 503)


def _payload(body: dict[str, Any], endpoint: Endpoint, model: str) -> dict[str, Any]:
    backend_model = endpoint.backend_model(model)
    if backend_model == model:
        return body
    return {**body, "model": backend_model}


async def _whole(runtime: Runtime, endpoints: list[Endpoint], op: str, body: dict[str, Any], model: str) -> Response:
    failure: BackendFailure | None = None
    for endpoint in endpoints:
        try:
            answer = await runtime.dispatcher(endpoint).call(endpoint, op, _payload(body, endpoint, model))
        except BackendFailure as exc:
            failure = exc
            if _retryable(exc):
                endpoint.mark_down()
                continue
            break
        if "model" in answer and endpoint.backend_model(model) != model:
            answer["model"] = model
        return json_response(answer)
    assert failure is not None
    raise client_error(failure, model)


async def _relay(first: bytes, events: AsyncIterator[bytes], model: str, rid: str) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for event in events:
            yield event
    except BackendFailure as exc:
        # The 200 and some events are already with the client: say what happened in-band, then end the stream.
        log.warning("stream for request %s broke off: %s", rid, exc)
        yield sse_error_event(client_error(exc, model))
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def _streamed(
    runtime: Runtime, endpoints: list[Endpoint], op: str, body: dict[str, Any], model: str, rid: str
) -> Response:
    failure: BackendFailure | None = None
    for endpoint in endpoints:
        events = runtime.dispatcher(endpoint).stream(endpoint, op, _payload(body, endpoint, model))
        try:
            first = await anext(events, b"")
        except BackendFailure as exc:
            failure = exc
            if _retryable(exc):
                endpoint.mark_down()
                continue
            break
        return StreamingResponse(
            _relay(first, events, model, rid), media_type="text/event-stream", headers=_STREAM_HEADERS
        )
    assert failure is not None
    raise client_error(failure, model)


async def _infer(request: Request, op: str) -> Response:
    runtime: Runtime = request.app.state.runtime
    identity = await authenticate(request)
    body = await read_json(request, runtime.config.server.max_body_bytes)
    model = validate(op, body)
    params = request.path_params
    endpoints = runtime.registry.candidates(model, identity, params.get("cluster"), params.get("framework"))
    if body.get("stream"):
        return await _streamed(runtime, endpoints, op, body, model, request_id(request))
    return await _whole(runtime, endpoints, op, body, model)


@api_handler
async def chat_completions(request: Request) -> Response:
    return await _infer(request, "chat/completions")


@api_handler
async def completions(request: Request) -> Response:
    return await _infer(request, "completions")


@api_handler
async def embeddings(request: Request) -> Response:
    return await _infer(request, "embeddings")
