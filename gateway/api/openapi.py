"""The gateway's OpenAPI document, kept as data in ``openapi.yaml`` beside this module and served as JSON."""

from __future__ import annotations

import functools
from pathlib import Path

import orjson
import yaml
from starlette.requests import Request
from starlette.responses import Response

from gateway.api.responses import api_handler

_DOCUMENT = Path(__file__).with_name("openapi.yaml")


@functools.cache
def document() -> bytes:
    return orjson.dumps(yaml.safe_load(_DOCUMENT.read_text()))


@api_handler
async def openapi(request: Request) -> Response:
    return Response(document(), media_type="application/json")
