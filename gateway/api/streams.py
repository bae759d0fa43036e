"""The door through which workers push streamed answers back to the gateway (see ``gateway.streaming``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.api.responses import api_handler, request_id
from gateway.auth.bearer import bearer_token
from gateway.errors import AuthenticationFailed, GatewayError, error_response
from gateway.runtime import Runtime
from gateway.streaming.relay import RelayRefused, SenderGone

# A refusal comes before the body is read, and the worker may still be sending it: closing the connection is
# what makes its next write fail, so that it stops and lets its model server's request go.
_CLOSE = {"connection": "close"}


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise SenderGone from None


@api_handler
async def receive_stream(request: Request) -> Response:
    """``POST /resource_server/internal/streams/{stream_id}`` with ``Authorization: Bearer <stream token>``."""
    runtime: Runtime = request.app.state.runtime
    try:
        token = bearer_token(request.headers.get("authorization"))
        await runtime.relay.receive(request.path_params["stream_id"], token, _body(request))
    except AuthenticationFailed as exc:
        return error_response(GatewayError(exc.message, status=401, code=exc.code, headers=_CLOSE), request_id(request))
    except RelayRefused as exc:
        error = GatewayError(exc.message, status=exc.status, code=exc.code, headers=_CLOSE)
        return error_response(error, request_id(request))
    return Response(status_code=204)
