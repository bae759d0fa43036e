"""Typed errors and the one place that turns them into OpenAI-shaped responses.

Handlers raise; they never build error bodies by hand. The body is always
``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_token"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ClientClosedRequest(GatewayError):
    """The client went away before its request had arrived whole; nobody reads the answer, the logs and metrics do.

    499 is the status proxies (nginx) log for this, so that it is not counted as the server's failure.
    """

    status = 499
    type = "invalid_request_error"
    code = "client_disconnected"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UriTooLong(GatewayError):
    status = 414
    type = "invalid_request_error"
    code = "uri_too_long"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class InvalidHttpRequest(GatewayError):
    """A request the HTTP parser refused before the application saw it."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_http_request"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamProtocolError(GatewayError):
    status = 502
    type = "server_error"
    code = "bad_gateway"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamError(GatewayError):
    """An error answered by the backend itself (4xx), relayed in the gateway's shape."""

    type = "invalid_request_error"
    code = "upstream_error"


def error_response(error: GatewayError, request_id: str | None = None) -> Response:
    headers = {"content-type": "application/json", **error.headers}
    if request_id:
        headers["x-request-id"] = request_id
    return Response(orjson.dumps(error.body()), status_code=error.status, headers=headers)


def sse_error_event(error: GatewayError) -> bytes:
    """An in-band error for a stream whose 200 status has already been sent."""
    return b"data: " + orjson.dumps(error.body()) + b"\n\ndata: [DONE]\n\n"
