"""Who the gateway takes the caller to be."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.api.responses import api_handler, authenticate, json_response


@api_handler
async def whoami(request: Request) -> Response:
    identity = await authenticate(request)
    return json_response(identity.to_dict())
