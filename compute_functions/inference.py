"""The ``inference`` compute function: one OpenAI request against the model server on this node.

It runs on a worker (through Parsl or Globus Compute), so it reports every expected failure in its result instead of
raising: a dict travels back through any transport, an exception class may not unpickle on the other side.

The request::

    {"op": one of ``routes.OPERATIONS`` ("chat/completions", "completions", "embeddings", "responses", ...),
     "payload": {...},                 # the OpenAI body, with the model name the server knows
     "model_server": {"command": [...], "host": ..., "port": ..., "health_path": ..., "startup_timeout": ...,
                      "idle_timeout": ..., "env": {...}, "state_dir": ... (optional)},
     "timeout": seconds,               # for the model server's answer
     "stream": None | {"url": ..., "token": ...}}

A whole answer comes back as ``{"ok": True, "response": {...}}``. A streamed one is pushed, event by event as the
server writes it, in the body of one HTTP request to ``stream["url"]`` (the gateway's relay), and the result is
``{"ok": True, "streamed": n_events}``. A failure is ``{"ok": False, "error": {"kind", "status", "body", "message"}}``
with ``kind`` one of ``model_start_failed``, ``upstream``, ``timeout``, ``relay`` or ``cancelled``.

With ``"node_requests": n`` (and ``stream`` set, whole answers too), the worker hands the request to the node's
request server (``request_server``), which serves up to ``n`` at once on one event loop, and the task returns
``{"ok": True, "relayed": True}`` as soon as the server has taken it. The request's outcome (the result above) then
comes through the relay, as the last event of the body: ``event: outcome``, its JSON as data. The relay request
is open from the start, so a request server that dies breaks it at once. ``{"group": [request, ...]}`` hands over
several such requests in one task.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from backend_http.client import ConnectionBroken, Http, ServerUnreachable
from compute_functions import json_codec, node, request_server
from compute_functions.model_server import ModelServerFailed
from compute_functions.routes import OPERATIONS, url_of
from compute_functions.sse import EventCounter

log = logging.getLogger("compute_functions.inference")

_MAX_ERROR_BODY = 64 * 1024
_CONNECT_TIMEOUT = 10.0
# A server that refused a connection may be restarting (or stopped as idle a moment ago): look again this often.
_ATTEMPTS = 3

_clients: dict[str, httpx.Client] = {}
# How a worker starts the node's request server (see ``request_server.hand_over``).
_SERVE_NODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); from compute_functions.inference import serve_node; "
    "serve_node(*sys.argv[2:])"
)


def _client(kind: str) -> httpx.Client:
    """One pooled client per worker process and purpose, so that requests reuse connections."""
    client = _clients.get(kind)
    if client is None:
        # The model server is on this node: never send its traffic through a site's HTTP proxy. The relay may
        # have to go through one to reach the gateway, so it honours the proxy settings of the environment.
        # Each request sets its own timeouts.
        # Threads share the client: no cap on connections beyond the requests a worker holds.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        client = httpx.Client(trust_env=kind == "relay", timeout=_CONNECT_TIMEOUT, limits=limits)
        _clients.setdefault(kind, client)
        client = _clients[kind]
    return client


def failure(kind: str, message: str, status: int | None = None, body: str = "") -> dict[str, Any]:
    return {"ok": False, "error": {"kind": kind, "status": status, "body": body[:_MAX_ERROR_BODY], "message": message}}


def invalid_answer(message: str) -> dict[str, Any]:
    """A 200 that is not the protocol: the worker, a proxy here, reports a bad gateway."""
    return failure("upstream", message, 502, json.dumps({"error": {"message": message, "type": "bad_gateway"}}))


def inference(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one OpenAI request with the model server of this node, starting it when needed; see the module doc."""
    group: list[dict[str, Any]] = request.get("group", [request])
    for one in group:
        if one["op"] not in OPERATIONS:
            raise ValueError(f"unknown operation {one['op']!r}")
    if request.get("node_requests") or "group" in request:
        # To the node's request servers (one per state directory), all at once.
        by_server: dict[str, list[dict[str, Any]]] = {}
        for one in group:
            if not one.get("stream") or not one.get("node_requests"):
                raise ValueError("a request for the request server needs node_requests and stream (the relay)")
            directory = node.LaunchSpec.from_settings(one["model_server"], "").state_dir
            by_server.setdefault(directory, []).append(one)
        for directory, requests in by_server.items():
            held = int(requests[0]["node_requests"])
            launching = functools.partial(_launch_model_servers, requests)
            request_server.hand_over(Path(directory), requests, held, _SERVE_NODE, launching)
        return {"ok": True, "relayed": True}
    answer = _answer(request)
    if not _streams(request):
        return _finished(answer)
    try:
        first = next(answer)
    except StopIteration as end:
        # It failed before the model server streamed anything: the result says so, no relay request needed.
        outcome: dict[str, Any] = end.value
        return outcome
    return _relay(first, answer, request, request["stream"])


def _launch_model_servers(requests: list[dict[str, Any]]) -> None:
    """Start the model servers ``requests`` need, while the request server that will wait on them starts too.

    Both take a Python process's start (a fraction of a second), which a first request would otherwise wait for
    one after the other.
    """
    specs = [_spec(one["model_server"], str(one["payload"].get("model", ""))) for one in requests]
    for spec in {spec.key: spec for spec in specs}.values():
        node.launch(spec)


def _streams(request: dict[str, Any]) -> bool:
    """Whether the model server's answer is an event stream; in the request server, ``stream`` carries whole answers
    too."""
    if request.get("node_requests"):
        return bool(request["payload"].get("stream"))
    return bool(request.get("stream"))


def serve_node(directory: str, held: str, first_client: str) -> None:
    """The node's request server (started by ``hand_over``): each request a task, its outcome to the relay or
    down its node channel."""
    request_server.serve(Path(directory), int(held), int(first_client), _serve_relayed, _serve_over)


def _finished(answer: Generator[bytes, None, dict[str, Any]]) -> dict[str, Any]:
    """The outcome of a whole answer, which streams nothing."""
    try:
        while True:
            next(answer)
    except StopIteration as end:
        outcome: dict[str, Any] = end.value
        return outcome


def _answer(request: dict[str, Any]) -> Generator[bytes, None, dict[str, Any]]:
    """The events of a streamed answer as the model server writes them (none for a whole one); returns the outcome."""
    op = request["op"]
    payload: dict[str, Any] = request["payload"]
    spec = node.LaunchSpec.from_settings(request["model_server"], str(payload.get("model", "")))
    timeout = httpx.Timeout(float(request.get("timeout") or 600.0), connect=_CONNECT_TIMEOUT)
    for attempt in range(_ATTEMPTS):
        try:
            base_url = node.ensure_server(spec)
        except ModelServerFailed as exc:
            return failure("model_start_failed", f"the model server did not start: {exc}", body=str(exc))
        try:
            if _streams(request):
                return (yield from _streamed(url_of(base_url, op), payload, timeout))
            return _whole(url_of(base_url, op), payload, timeout)
        except httpx.ConnectError:
            # Only ever before the first event: nothing was sent on yet, so the request may go again.
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


def _streamed(url: str, payload: dict[str, Any], timeout: httpx.Timeout) -> Generator[bytes, None, dict[str, Any]]:
    # Made before the model server starts generating: a worker's first client takes a while to set up (proxy
    # settings, TLS context), and meanwhile the first tokens would wait.
    _client("relay")
    events = EventCounter()
    try:
        with _client("upstream").stream("POST", url, json=payload, timeout=timeout) as upstream:
            if upstream.status_code >= 400:
                upstream.read()
                return failure("upstream", "the model server answered an error", upstream.status_code, upstream.text)
            content_type = upstream.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                upstream.read()
                return invalid_answer(f"the model server answered {content_type!r}, not an event stream")
            # The server's events go on as they arrive: no batching, no delay.
            for data in upstream.iter_bytes():
                events.feed(data)
                yield data
    except httpx.TimeoutException:
        return failure(
            "timeout",
            "the model server stopped streaming" if events.events else "the model server did not answer in time",
        )
    except httpx.ConnectError:
        if events.events:
            return failure("upstream", "the stream broke off: ConnectError")
        raise
    except httpx.TransportError as exc:
        broke = "the stream broke off" if events.events else "the model server broke off"
        return failure("upstream", f"{broke}: {exc.__class__.__name__}")
    return {"ok": True, "streamed": events.events}


class _UpstreamBroke(Exception):
    """Raised inside the relay's body when the model server's stream fails, to abort the relay request."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result["error"]["message"])
        self.result = result


def _relay(
    first: bytes, answer: Generator[bytes, None, dict[str, Any]], request: dict[str, Any], stream: dict[str, Any]
) -> dict[str, Any]:
    """Copy the server's events to the gateway as they arrive; a stream that fails midway aborts the relay request."""
    outcome: dict[str, Any] = {}

    def body() -> Generator[bytes, None, None]:
        nonlocal outcome
        yield first
        outcome = yield from answer
        if not outcome["ok"]:
            raise _UpstreamBroke(outcome)

    try:
        # Closed here, not whenever the collector gets to it: closing it closes the model server's request.
        with contextlib.closing(body()) as events, contextlib.closing(answer):
            answered = _post_relay(stream, events, float(request.get("timeout") or 600.0))
    except _UpstreamBroke as exc:
        return exc.result
    except httpx.TransportError as exc:
        # Upstream failures surface here too when the transport wraps the body's exception.
        if isinstance(exc.__context__, _UpstreamBroke):
            return exc.__context__.result
        raise
    return answered or outcome


async def _pieces(request: dict[str, Any], patience: float) -> AsyncGenerator[bytes, None]:
    """In the request server: the model server's events as they arrive, then the outcome event."""
    outcome: dict[str, Any] = {}
    arrived: collections.deque[bytes] = collections.deque()
    news = asyncio.Event()

    def arrive(piece: bytes) -> None:
        arrived.append(piece)
        news.set()

    answering = asyncio.ensure_future(_answer_async(request, patience, outcome, arrive))
    answering.add_done_callback(lambda _: news.set())
    try:
        while True:
            await news.wait()
            news.clear()
            while arrived:
                yield arrived.popleft()
            if answering.done():
                break
        answering.result()  # a fault of this code, not of the request, goes up
    finally:
        # Cancelled when nobody reads the rest (the relay refused it): that closes the model server's request.
        answering.cancel()
    yield _outcome_event(outcome)


def _outcome_event(outcome: dict[str, Any]) -> bytes:
    return b"event: outcome\ndata: " + json_codec.dumps(outcome) + b"\n\n"


async def _serve_over(request: dict[str, Any], send: request_server.Send) -> None:
    """In the request server, for a request that came down a node channel: its pieces go back the same way.

    A channel that breaks, or the gateway's cancel, cancels this task, which closes the model server's request.
    The events go to ``send`` from the model server's connection as they arrive: this task does not wake per event.
    """
    outcome: dict[str, Any] = {}
    await _answer_async(request, float(request.get("timeout") or 600.0), outcome, send)
    send(_outcome_event(outcome))


async def _serve_relayed(request: dict[str, Any]) -> None:
    """In the request server: the events, then the outcome, in one relay request opened before either."""
    stream = request["stream"]
    timeout = float(request.get("timeout") or 600.0)

    def body() -> AsyncGenerator[bytes, None]:
        # The relay request's head goes before the first piece, so the relay sees a dead server from the start.
        return _pieces(request, timeout)

    headers = {"authorization": f"Bearer {stream['token']}", "content-type": "text/event-stream"}
    try:
        # Closed here when the relay refuses the rest (the client left): that closes the model server's request.
        async with contextlib.aclosing(body()) as pieces:
            parts = urlsplit(stream["url"])
            # The relay may be outside the site: through its proxy when the environment names one.
            relay = _http(f"{parts.scheme}://{parts.netloc}", timeout, proxy=True)
            reply = await relay.upload(parts.path, pieces, headers)
            reply.close()
    except (OSError, TimeoutError, httpx.TransportError):
        # Nobody waits for what the relay answers: a gateway that gave up has its own error already.
        pass
    except Exception:
        # A fault here, not in the request: the gateway sees the relay request break, the server's log says why.
        log.exception("a relayed request failed")


# The request server's clients, by origin, patience and proxying: kept-alive connections to the model server and
# to the relay.
_https: dict[tuple[str, float, bool], Http] = {}


def _http(origin: str, patience: float, *, proxy: bool) -> Http:
    http = _https.get((origin, patience, proxy))
    if http is None:
        http = Http(origin, {}, connect_timeout=_CONNECT_TIMEOUT, read_timeout=patience, proxy=proxy)
        _https[(origin, patience, proxy)] = http
    return http


# The request server's launch specs by their settings and model: every request names one of a few.
_specs: dict[tuple[str, str], node.LaunchSpec] = {}


def _spec(settings: dict[str, Any], model: str) -> node.LaunchSpec:
    key = (repr(settings), model)
    spec = _specs.get(key)
    if spec is None:
        if len(_specs) > 1000:
            _specs.clear()
        spec = _specs[key] = node.LaunchSpec.from_settings(settings, model)
    return spec


async def _answer_async(
    request: dict[str, Any], patience: float, outcome: dict[str, Any], sink: Callable[[bytes], None]
) -> None:
    """As ``_answer``, in the request server's event loop: the events of a streamed answer go to ``sink`` as they
    arrive (see ``Reply.deliver``); ``outcome`` is filled."""
    op = request["op"]
    payload: dict[str, Any] = request["payload"]
    spec = _spec(request["model_server"], str(payload.get("model", "")))
    data = json_codec.dumps(payload)
    streams = _streams(request)
    for attempt in range(_ATTEMPTS):
        base_url = node.known_server(spec)
        if base_url is None:
            try:
                # Starting a model server waits on locks and its health check: away from the loop.
                base_url = await asyncio.to_thread(node.ensure_server, spec)
            except ModelServerFailed as exc:
                outcome.update(failure("model_start_failed", f"the model server did not start: {exc}", body=str(exc)))
                return
        url = urlsplit(url_of(base_url, op))
        # The model server is on this node: its traffic never goes through a site's proxy.
        upstream = _http(f"{url.scheme}://{url.netloc}", patience, proxy=False)
        try:
            reply = await upstream.request("POST", url.path, data)
        except ServerUnreachable:
            node.forget(spec)
            await asyncio.sleep(0.5 * attempt)
            continue
        except TimeoutError:
            outcome.update(failure("timeout", "the model server did not answer in time"))
            return
        except ConnectionBroken as exc:
            outcome.update(failure("upstream", f"the model server broke off: {exc}"))
            return
        events = EventCounter()
        try:
            if reply.status >= 400:
                text = (await reply.read()).decode(errors="replace")
                outcome.update(failure("upstream", "the model server answered an error", reply.status, text))
            elif streams and reply.content_type != "text/event-stream":
                await reply.read()
                outcome.update(invalid_answer(f"the model server answered {reply.content_type!r}, not an event stream"))
            elif streams:
                await reply.deliver(_counting(events, sink))
                outcome.update({"ok": True, "streamed": events.events})
            else:
                outcome.update(_parsed(await reply.read()))
        except TimeoutError:
            late = "stopped streaming" if events.events else "did not answer in time"
            outcome.update(failure("timeout", f"the model server {late}"))
        except ConnectionBroken as exc:
            outcome.update(failure("upstream", f"the stream broke off: {exc}"))
        finally:
            reply.close()
            node.mark_used(spec)
        return
    outcome.update(failure("upstream", "the model server refused the connection"))


def _counting(events: EventCounter, sink: Callable[[bytes], None]) -> Callable[[bytes], None]:
    def counted(piece: bytes) -> None:
        events.feed(piece)
        sink(piece)

    return counted


def _parsed(body: bytes) -> dict[str, Any]:
    try:
        answer = json_codec.loads(body)
    except ValueError:
        return invalid_answer("the model server's answer is not JSON")
    if not isinstance(answer, dict):
        return invalid_answer("the model server's answer is not a JSON object")
    return {"ok": True, "response": answer}


def _post_relay(stream: dict[str, Any], body: Iterator[bytes], read_timeout: float) -> dict[str, Any] | None:
    """POST ``body`` to the relay: None once it took all of it, or the failure that stopped it.

    ``httpx.TransportError`` other than a failed connection propagates, with the body's own exception as context.
    """
    headers = {"authorization": f"Bearer {stream['token']}", "content-type": "text/event-stream"}
    try:
        answer = _client("relay").post(
            stream["url"], content=body, headers=headers, timeout=httpx.Timeout(read_timeout, connect=10.0)
        )
    except httpx.ConnectError as exc:
        return failure("relay", f"cannot reach the gateway's relay at {stream['url']}: {exc}")
    except httpx.TransportError as exc:
        if isinstance(exc.__context__, _UpstreamBroke):
            raise
        # The gateway breaks the connection when nobody waits for the stream any more.
        return failure("cancelled", f"the gateway closed the stream: {exc.__class__.__name__}")
    if answer.status_code in (200, 204):
        return None
    if answer.status_code in (410, 499):
        return failure("cancelled", "the client went away", answer.status_code, answer.text)
    return failure("relay", "the gateway's relay refused the stream", answer.status_code, answer.text)
