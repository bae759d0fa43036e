"""The APIs beside chat, completions and embeddings that model servers such as vLLM serve.

OpenAI's Responses (``responses``), Anthropic's Messages (``messages`` and ``messages/count_tokens``),
rerank and score, and the tokenizer (``tokenize``, ``detokenize``) go through the same path as chat: the
gateway checks the fields it acts on (the model, ``stream``, the token limits), picks an endpoint, and passes
the body through unchanged. What differs per API lives here: those checks, which endpoints answer it, and how an error
travels inside its stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.api import anthropic
from gateway.dispatch.base import BackendError
from gateway.errors import GatewayError, InvalidRequest, NotFound, sse_error_event
from gateway.federation.registry import Endpoint

APIS = frozenset({"responses", "messages", "messages/count_tokens", "rerank", "score", "tokenize", "detokenize"})
# The APIs that can stream, each with its own events; the others answer whole.
_STREAMING = frozenset({"responses", "messages"})
# The token limit of each generating API, and whether it is required (Anthropic's ``max_tokens`` is).
_TOKEN_LIMITS = {"responses": ("max_output_tokens", False), "messages": ("max_tokens", True)}


def check(op: str, body: dict[str, Any]) -> None:
    """Check the control fields of a body for ``op`` (one of ``APIS``); the rest passes through unchanged."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false.", param="stream", code="invalid_type")
    if stream and op not in _STREAMING:
        raise InvalidRequest(f"/v1/{op} cannot be streamed.", param="stream", code="invalid_value")
    limit = _TOKEN_LIMITS.get(op)
    if limit is None:
        return
    name, required = limit
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required.", param=name, code="missing_required_parameter")
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"'{name}' must be an integer of at least 1.", param=name, code="invalid_value")


def offering(candidates: list[Endpoint], op: str) -> list[Endpoint]:
    """The ``candidates`` whose model servers answer ``op``; 404 naming the route and endpoints when none does."""
    offered = [endpoint for endpoint in candidates if endpoint.offers(op)]
    if offered or not candidates:
        return offered
    names = ", ".join(endpoint.id for endpoint in candidates)
    raise NotFound(f"/v1/{op} is not served by endpoint {names}.", code="route_not_served")


def route_missing(body: bytes) -> bool:
    """Whether a backend's 404 says the route does not exist (rather than, say, the model).

    FastAPI answers ``{"detail": "Not Found"}``; vLLM's handler and the simulator put "Not Found" in an
    OpenAI error, and llama.cpp's server "File Not Found".
    """
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(parsed, dict):
        return False
    error = parsed.get("error")
    message = error.get("message") if isinstance(error, dict) else parsed.get("detail")
    return isinstance(message, str) and message.startswith(("Not Found", "File Not Found"))


def lacks_route(endpoint: Endpoint, op: str, failure: Exception) -> bool:
    """Whether ``failure`` is the endpoint's model server answering 404 for ``op``'s route, which it then remembers
    (so that another endpoint of the model may serve the request, and later ones go there at once)."""
    if isinstance(failure, BackendError) and failure.status == 404 and route_missing(failure.body):
        endpoint.unserved.add(op)
        return True
    return False


def not_served(endpoint: Endpoint, op: str) -> NotFound:
    """The error for an endpoint whose model server answered 404 for ``op``'s route, which it now remembers."""
    endpoint.unserved.add(op)
    return NotFound(
        f"/v1/{op} is not served by endpoint {endpoint.id}: its model server has no such route.",
        code="route_not_served",
    )


def stream_error_event(op: str | None, error: GatewayError) -> bytes:
    """An in-band error in the events of ``op``'s stream, once its 200 status has been sent."""
    if op == "messages":
        return anthropic.error_event(error)
    if op == "responses":
        # The Responses API's own error event; its streams end without [DONE].
        event = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
    return sse_error_event(error)
