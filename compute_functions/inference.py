"""The ``inference`` compute function: one OpenAI request against the model server on this node.

It runs on a worker (through Parsl or Globus Compute), so it reports every expected failure in its result instead of
raising: a dict travels back through any transport, an exception class may not unpickle on the other side.

The request::

    {"op": "chat/completions" | "completions" | "embeddings" | ... (``compute_functions.routes.OPERATIONS``),
     "payload": {...},                 # the OpenAI body, with the model name the server knows
     "model_server": {"command": [...], "host": ..., "port": ..., "health_path": ..., "startup_timeout": ...,
                      "idle_timeout": ..., "env": {...}, "state_dir": ... (optional)},
     "timeout": seconds,               # for the model server's answer
     "stream": None | {"url": ..., "token": ...}}

A whole answer comes back as ``{"ok": True, "response": {...}}``. A streamed one is pushed, event by event as the
server writes it, in the body of one HTTP request to ``stream["url"]`` (the gateway's relay), and the result is
``{"ok": True, "streamed": n_events}``. A failure is ``{"ok": False, "error": {"kind", "status", "body", "message"}}``
with ``kind`` one of ``model_start_failed``, ``upstream``, ``timeout``, ``relay`` or ``cancelled``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from compute_functions import node
from compute_functions.model_server import ModelServerFailed
from compute_functions.routes import OPERATIONS, url_of
from compute_functions.sse import EventCounter

_MAX_ERROR_BODY = 64 * 1024
_CONNECT_TIMEOUT = 10.0
# A server that refused a connection may be restarting (or stopped as idle a moment ago): look again this often.
_ATTEMPTS = 3

_clients: dict[str, httpx.Client] = {}


def _client(kind: str) -> httpx.Client:
    """One pooled client per worker process and purpose, so that requests reuse connections."""
    client = _clients.get(kind)
    if client is None:
        # The model server is on this node: never send its traffic through a site's HTTP proxy. The relay may
        # have to go through one to reach the gateway, so it honours the proxy settings of the environment.
        # Each request sets its own timeouts.
        client = httpx.Client(trust_env=kind == "relay", timeout=_CONNECT_TIMEOUT)
        _clients[kind] = client
    return client


def failure(kind: str, message: str, status: int | None = None, body: str = "") -> dict[str, Any]:
    return {"ok": False, "error": {"kind": kind, "status": status, "body": body[:_MAX_ERROR_BODY], "message": message}}


def invalid_answer(message: str) -> dict[str, Any]:
    """A 200 that is not the protocol: the worker, a proxy here, reports a bad gateway."""
    return failure("upstream", message, 502, json.dumps({"error": {"message": message, "type": "bad_gateway"}}))


def inference(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one OpenAI request with the model server of this node, starting it when needed; see the module doc."""
    op = request["op"]
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}")
    payload: dict[str, Any] = request["payload"]
    spec = node.LaunchSpec.from_settings(request["model_server"], str(payload.get("model", "")))
    timeout = httpx.Timeout(float(request.get("timeout") or 600.0), connect=_CONNECT_TIMEOUT)
    stream = request.get("stream")
    for attempt in range(_ATTEMPTS):
        try:
            base_url = node.ensure_server(spec)
        except ModelServerFailed as exc:
            return failure("model_start_failed", f"the model server did not start: {exc}", body=str(exc))
        try:
            if stream:
                return _streamed(url_of(base_url, op), payload, timeout, stream)
            return _whole(url_of(base_url, op), payload, timeout)
        except httpx.ConnectError:
            node.forget(spec)
            time.sleep(0.5 * attempt)
        finally:
            node.mark_used(spec)
    return failure("upstream", "the model server refused the connection")


def _whole(url: str, payload: dict[str, Any], timeout: httpx.Timeout) -> dict[str, Any]:
    try:
        response = _client("upstream").post(url, json=payload, timeout=timeout)
    except httpx.TimeoutException:
        return failure("timeout", "the model server did not answer in time")
    except httpx.ConnectError:
        raise
    except httpx.TransportError as exc:
        return failure("upstream", f"the model server broke off: {exc.__class__.__name__}")
    if response.status_code >= 400:
        return failure("upstream", "the model server answered an error", response.status_code, response.text)
    try:
        answer = response.json()
    except ValueError:
        return invalid_answer("the model server's answer is not JSON")
    if not isinstance(answer, dict):
        return invalid_answer("the model server's answer is not a JSON object")
    return {"ok": True, "response": answer}


class _UpstreamBroke(Exception):
    """Raised inside the relay's body when the model server's stream fails, to abort the relay request."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result["error"]["message"])
        self.result = result


def _streamed(url: str, payload: dict[str, Any], timeout: httpx.Timeout, stream: dict[str, Any]) -> dict[str, Any]:
    # Made before the model server starts generating: a worker's first client takes a while to set up (proxy
    # settings, TLS context), and meanwhile the first tokens would wait.
    _client("relay")
    try:
        with _client("upstream").stream("POST", url, json=payload, timeout=timeout) as upstream:
            if upstream.status_code >= 400:
                upstream.read()
                return failure("upstream", "the model server answered an error", upstream.status_code, upstream.text)
            content_type = upstream.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                upstream.read()
                return invalid_answer(f"the model server answered {content_type!r}, not an event stream")
            return _relay(upstream, timeout, stream)
    except httpx.TimeoutException:
        return failure("timeout", "the model server did not answer in time")
    except httpx.ConnectError:
        raise
    except httpx.TransportError as exc:
        return failure("upstream", f"the model server broke off: {exc.__class__.__name__}")


def _relay(upstream: httpx.Response, timeout: httpx.Timeout, stream: dict[str, Any]) -> dict[str, Any]:
    """Copy the server's events to the gateway as they arrive: no batching, no delay."""
    events = EventCounter()

    def body() -> Iterator[bytes]:
        try:
            for data in upstream.iter_bytes():
                events.feed(data)
                yield data
        except httpx.TimeoutException:
            raise _UpstreamBroke(failure("timeout", "the model server stopped streaming")) from None
        except httpx.TransportError as exc:
            raise _UpstreamBroke(failure("upstream", f"the stream broke off: {exc.__class__.__name__}")) from None

    headers = {"authorization": f"Bearer {stream['token']}", "content-type": "text/event-stream"}
    try:
        answer = _client("relay").post(
            stream["url"], content=body(), headers=headers, timeout=httpx.Timeout(timeout.read, connect=10.0)
        )
    except _UpstreamBroke as exc:
        return exc.result
    except httpx.ConnectError as exc:
        return failure("relay", f"cannot reach the gateway's relay at {stream['url']}: {exc}")
    except httpx.TransportError as exc:
        # Upstream failures surface here too when the transport wraps the body's exception.
        if isinstance(exc.__context__, _UpstreamBroke):
            return exc.__context__.result
        # The gateway breaks the connection when nobody waits for the stream any more.
        return failure("cancelled", f"the gateway closed the stream: {exc.__class__.__name__}")
    if answer.status_code in (200, 204):
        return {"ok": True, "streamed": events.events}
    if answer.status_code in (410, 499):
        return failure("cancelled", "the client went away", answer.status_code, answer.text)
    return failure("relay", "the gateway's relay refused the stream", answer.status_code, answer.text)
