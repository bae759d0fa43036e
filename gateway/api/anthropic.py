"""Anthropic's error shape, for the Messages API (``/v1/messages``).

Its clients (the ``anthropic`` SDK, coding assistants) read errors as
``{"type": "error", "error": {"type", "message"}}``, and in a stream as an ``error`` event of that shape.
The gateway's own errors keep their status; only the body is said Anthropic's way. The token may come as
Anthropic's ``x-api-key`` header too, which is how its SDK and tools send a key.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.responses import EventStream, Handler
from gateway.errors import GatewayError

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _TYPES.get(status, "api_error"), "message": message}}


def error_event(error: GatewayError) -> bytes:
    """An in-band error for a Messages stream whose 200 status has already been sent."""
    return b"event: error\ndata: " + orjson.dumps(error_body(error.status, error.message)) + b"\n\n"


def anthropic_errors(handler: Handler) -> Handler:
    """Take the token from ``x-api-key`` too, and say the errors of ``handler`` (an ``api_handler``, whose errors
    are OpenAI-shaped) in Anthropic's shape."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        headers = Headers(scope=request.scope)
        key = headers.get("x-api-key")
        if key is not None and "authorization" not in headers:
            request.scope["headers"] = [*request.scope["headers"], (b"authorization", f"Bearer {key}".encode())]
        response = await handler(request)
        if response.status_code < 400 or isinstance(response, EventStream):
            return response
        error = orjson.loads(bytes(response.body)).get("error", {})
        kept = {name: value for name, value in response.headers.items() if name != "content-length"}
        body = orjson.dumps(error_body(response.status_code, str(error.get("message", ""))))
        return Response(body, status_code=response.status_code, headers=kept)

    return wrapped
