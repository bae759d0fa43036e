"""What every API handler shares: the request id, the body reader, JSON answers and error mapping."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth.base import Identity
from gateway.auth.bearer import bearer_token
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, error_response

log = logging.getLogger("gateway.api")

Handler = Callable[[Request], Awaitable[Response]]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(request: Request) -> str:
    """The caller's ``X-Request-ID`` when it is sane, else a new one; kept on the request."""
    existing: str | None = request.scope.get("request_id")
    if existing is not None:
        return existing
    given = request.headers.get("x-request-id")
    rid = given if given and _REQUEST_ID.match(given) else os.urandom(12).hex()
    request.scope["request_id"] = rid
    return rid


def api_handler(handler: Handler) -> Handler:
    """Turn raised ``GatewayError``s into OpenAI-shaped answers and anything unexpected into a 500."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        rid = request_id(request)
        try:
            response = await handler(request)
        except GatewayError as exc:
            return error_response(exc, rid)
        except Exception:
            log.exception("unexpected error in %s %s (request %s)", request.method, request.url.path, rid)
            return error_response(GatewayError(f"Internal error; quote request id {rid} when reporting it."), rid)
        response.headers["x-request-id"] = rid
        return response

    return wrapped


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def authenticate(request: Request) -> Identity:
    runtime = request.app.state.runtime
    identity: Identity = await runtime.authenticator.authenticate(bearer_token(request.headers.get("authorization")))
    return identity


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON; 413 past ``limit`` bytes, 400 when it is not JSON."""
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
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc.msg} at position {exc.pos}.", code="invalid_json"
        ) from None
