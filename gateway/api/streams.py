"""The doors through which workers push streamed answers back to the gateway (see ``gateway.streaming``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from gateway.accounting.record import request_id
from gateway.api.responses import api_handler
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


async def node_channel(websocket: WebSocket) -> None:
    """``/resource_server/internal/nodes/{channel_id}``: a node's request server dials in (``gateway.streaming.
    channels``), with ``Authorization: Bearer <channel token>``."""
    runtime: Runtime = websocket.app.state.runtime
    channels = runtime.channels
    channel_id = websocket.path_params["channel_id"]
    try:
        token = bearer_token(websocket.headers.get("authorization"))
    except AuthenticationFailed:
        token = ""
    if channels is None or not channels.admits(channel_id, token):
        # Refused before the upgrade: the node sees an HTTP 403 and keeps handing requests over through Parsl.
        await websocket.close(code=1008)
        return
    await websocket.accept()
    channel = channels.attach(channel_id, websocket.send_bytes)
    try:
        while True:
            message = await websocket.receive()
            data = message.get("text") or message.get("bytes")
            if data:
                channel.received(data)
            elif message["type"] == "websocket.disconnect":
                break
    finally:
        channels.detach(channel_id, channel)
