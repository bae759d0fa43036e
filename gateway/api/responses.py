"""What every API handler shares: the request id, the body reader, JSON answers and error mapping."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.accounting.record import SCOPE_KEY, RequestRecord, request_id
from gateway.auth.base import Identity
from gateway.auth.bearer import bearer_token
from gateway.errors import ClientClosedRequest, GatewayError, InvalidRequest, PayloadTooLarge, error_response

log = logging.getLogger("gateway.api")

Handler = Callable[[Request], Awaitable[Response]]


def api_handler(handler: Handler) -> Handler:
    """Turn raised ``GatewayError``s into OpenAI-shaped answers and anything unexpected into a 500.

    The request's record learns the status and error code here.
    """

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        rid = request_id(request)
        code: str | None = None
        error: GatewayError
        try:
            response = await handler(request)
        except GatewayError as exc:
            response, code = error_response(exc, rid), exc.code
        except ClientDisconnect:
            log.info("client left before sending all of %s %s (request %s)", request.method, request.url.path, rid)
            error = ClientClosedRequest("The client closed the connection before the request body had arrived.")
            response, code = error_response(error, rid), error.code
        except Exception:
            log.exception("unexpected error in %s %s (request %s)", request.method, request.url.path, rid)
            error = GatewayError(f"Internal error; quote request id {rid} when reporting it.")
            response, code = error_response(error, rid), error.code
        else:
            response.headers["x-request-id"] = rid
        record: RequestRecord | None = request.scope.get(SCOPE_KEY)
        if record is not None:
            record.answered(response.status_code, code)
        return response

    return wrapped


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


class EventStream(Response):
    """A server-sent event stream written as its events come, stopped at once when the client goes away.

    Starlette's ``StreamingResponse`` starts a task group of two tasks per response to watch for the
    disconnect; a stream's first bytes then wait on that machinery. Here one plain task waits for the
    disconnect and cancels the writer, which closes ``events`` and with it the upstream request.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writer = asyncio.current_task()
        assert writer is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            writer.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                watcher.cancel()
                await self.events.aclose()  # type: ignore[attr-defined]
            if gone:
                # The client left after the last event was written: take the watcher's cancellation here.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            if not gone:
                raise
            writer.uncancel()


async def authenticate(request: Request) -> Identity:
    runtime = request.app.state.runtime
    identity: Identity = await runtime.authenticator.authenticate(bearer_token(request.headers.get("authorization")))
    return identity


_CONTAINERS = (dict, list)


def _depth(value: Any) -> int:
    """How deeply ``value``'s arrays and objects nest (a scalar is 0), without recursion: one level at a time,
    keeping only the containers (a batch of token ids is a million integers looked at once each)."""
    deepest = 0
    level: list[Any] = [value] if value.__class__ in _CONTAINERS else []
    while level:
        deepest += 1
        level = [
            child
            for item in level
            for child in (item.values() if item.__class__ is dict else item)
            if child.__class__ in _CONTAINERS
        ]
    return deepest


def _too_deep(body: bytes, parsed: Any, max_depth: int) -> bool:
    # A body with fewer brackets than the limit cannot nest deeper; counting bytes in C spares the walk.
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    return _depth(parsed) > max_depth


async def read_json(request: Request, limit: int, max_depth: int) -> Any:
    """The request body parsed as JSON; 413 past ``limit`` bytes, 400 when it is not JSON or nests deeper than
    ``max_depth``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("Invalid Content-Length header.", code="invalid_request")
        if int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        body = await request.body()
    else:
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
            chunks.append(chunk)
        body = b"".join(chunks)
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if exc.msg == "depth limit exceeded":
            raise _nested_too_deep(max_depth) from None
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.", code="invalid_json"
        ) from None
    if _too_deep(body, parsed, max_depth):
        raise _nested_too_deep(max_depth)
    return parsed


def _nested_too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(
        f"The request body nests arrays and objects more than {max_depth} levels deep.", code="json_too_deep"
    )
