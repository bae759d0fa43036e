"""Chat completions, completions, embeddings and the other APIs of ``passthrough``: validate, pick an endpoint,
forward, relay the answer."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterator
from time import perf_counter
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.accounting.record import RequestRecord, Reserved, record_of, request_id
from gateway.accounting.streams import OWN_USAGE_EVENTS, asks_for_usage, for_client, with_usage
from gateway.api.anthropic import anthropic_errors
from gateway.api.passthrough import lacks_route, not_served, offering, route_missing, stream_error_event
from gateway.api.responses import EventStream, Handler, api_handler, authenticate, json_response, read_json
from gateway.api.validation import validate
from gateway.dispatch.base import (
    BackendError,
    BackendFailure,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
)
from gateway.errors import (
    GatewayError,
    ServiceUnavailable,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from gateway.federation.registry import Endpoint
from gateway.federation.selection import NOT_HOT, describe, explain, plan
from gateway.runtime import Runtime

log = logging.getLogger("gateway.api")

_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# The usage log's and the metrics' model for a request naming a model that no endpoint serves.
UNKNOWN_MODEL = "(unknown model)"


def _upstream_message(body: bytes) -> tuple[str, str | None]:
    """The message and code of a backend's error body, whatever OpenAI-like shape it has."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode(errors="replace").strip() or "(empty body)", None
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or orjson.dumps(error).decode()
        code = error.get("code")
        return str(message), code if isinstance(code, str) else None
    return str(error), None


def client_error(failure: BackendFailure, model: str, op: str | None = None) -> GatewayError:
    """The error the client sees for a backend failure (after failover had its chance)."""
    if isinstance(failure, BackendTimeout):
        return UpstreamTimeout(f"The backend for model '{model}' did not answer in time.")
    if isinstance(failure, BackendProtocolError):
        return UpstreamProtocolError(f"The backend for model '{model}' sent an invalid answer: {failure.detail}.")
    if isinstance(failure, BackendError):
        if failure.status == 404 and op is not None and route_missing(failure.body):
            return not_served(failure.endpoint, op)
        message, code = _upstream_message(failure.body)
        if failure.status == 503:
            return ServiceUnavailable(
                f"The backend for model '{model}' is unavailable: {message}", code="backend_unavailable"
            )
        if failure.status >= 500:
            return UpstreamProtocolError(
                f"The backend for model '{model}' failed (HTTP {failure.status}): {message}", code="upstream_error"
            )
        return UpstreamError(message, status=failure.status, code=code or "upstream_error")
    return ServiceUnavailable(
        f"No backend for model '{model}' could be reached; try again shortly.",
        code="backend_unavailable",
        headers={"retry-after": "5"},
    )


class _Failover:
    """The endpoints a request tries in turn, and what the client hears when none of them answered.

    Iterating gives the endpoints in order (each noted in the request's record as it comes); ``failed`` counts a
    failure against its endpoint and ends the iteration unless the next endpoint may still serve the request (it
    was unreachable, answered 503, or lacks the route); ``error`` is the last failure as the client's error.
    """

    __slots__ = ("endpoints", "failure", "model", "moves_on", "op", "record")

    def __init__(self, endpoints: list[Endpoint], op: str, model: str, record: RequestRecord) -> None:
        self.endpoints = endpoints
        self.op = op
        self.model = model
        self.record = record
        self.failure: BackendFailure | None = None
        self.moves_on = True

    def __iter__(self) -> Iterator[Endpoint]:
        for endpoint in self.endpoints:
            self.record.sent_to(endpoint)
            yield endpoint
            if not self.moves_on:
                return

    def failed(self, endpoint: Endpoint, failure: BackendFailure) -> None:
        _record(endpoint, failure)
        self.failure = failure
        self.moves_on = _retryable(failure) or lacks_route(endpoint, self.op, failure)

    def error(self) -> GatewayError:
        assert self.failure is not None
        return client_error(self.failure, self.model, self.op)


def _retryable(failure: BackendFailure) -> bool:
    return isinstance(failure, BackendUnavailable) or (isinstance(failure, BackendError) and failure.status == 503)


def _record(endpoint: Endpoint, failure: BackendFailure) -> None:
    """Count a failure against the endpoint's breaker unless the backend only refused this request (4xx)."""
    if isinstance(failure, BackendError) and failure.status < 500:
        endpoint.record_success()
    else:
        endpoint.record_failure(unreachable=isinstance(failure, BackendUnavailable))


def _payload(body: dict[str, Any], endpoint: Endpoint, model: str) -> dict[str, Any]:
    backend_model = endpoint.backend_model(model)
    if backend_model == model:
        return body
    return {**body, "model": backend_model}


def _route(runtime: Runtime, candidates: list[Endpoint], model: str, cluster_route: bool) -> list[Endpoint]:
    """The endpoints to try, in order; 503 (with the reason) when none can serve now."""
    federation = runtime.config.federation
    decided = plan(
        candidates, model, limit=federation.failover_attempts, round_robin=federation.policy == "round_robin"
    )
    if not decided.endpoints:
        in_maintenance = [endpoint for endpoint in decided.skipped if endpoint.maintenance is not None]
        if in_maintenance and (cluster_route or len(in_maintenance) == len(decided.skipped)):
            first = in_maintenance[0]
            raise ServiceUnavailable(
                f"Cluster '{first.cluster}' is under maintenance: {first.maintenance or 'no message'}",
                code="cluster_under_maintenance",
                headers={"retry-after": str(federation.retry_after)},
            )
        if cluster_route:
            # The caller named this endpoint: try it even if the last observation said offline.
            return [endpoint for endpoint in candidates if endpoint.maintenance is None]
        raise ServiceUnavailable(
            f"No backend for model '{model}' is reachable now ({describe(decided.skipped)}); try again shortly.",
            code="backend_unavailable",
            headers={"retry-after": "5"},
        )
    if decided.state in NOT_HOT and federation.when_not_hot == "reject":
        best = decided.endpoints[0]
        runtime.warm_up(best, best.backend_model(model))
        raise ServiceUnavailable(
            f"Model '{model}' is {explain(best, model)}; it is being started, try again shortly.",
            code=f"model_{decided.state}",
            headers={"retry-after": str(federation.retry_after)},
        )
    return decided.endpoints


async def _whole(runtime: Runtime, failover: _Failover, body: dict[str, Any], reservation: Reserved) -> Response:
    op, model, record = failover.op, failover.model, failover.record
    async with reservation:
        for endpoint in failover:
            began = perf_counter()
            with endpoint.serving():
                try:
                    answer = await runtime.dispatcher(endpoint).call(endpoint, op, _payload(body, endpoint, model))
                except BackendFailure as exc:
                    failover.failed(endpoint, exc)
                    continue
            if "model" in answer and endpoint.backend_model(model) != model:
                answer["model"] = model
            record.take_usage(answer.get("usage"))
            endpoint.record_success(perf_counter() - began, record.completion_tokens)
            return json_response(answer)
        raise failover.error()


async def _streamed(
    runtime: Runtime, failover: _Failover, body: dict[str, Any], reservation: Reserved
) -> AsyncGenerator[bytes, None]:
    """The answer's events for the client, after an empty first item once an endpoint's first event has come.

    Until then a failure (the rate limit, every endpoint failing) is raised, for the handler to answer with its
    status; after it a failure is sent in-band. Its reservation and the endpoint's in-flight count last until the
    generator ends: it is taken one step before the response starts, so that closing it always ends them.
    """
    op, model, record = failover.op, failover.model, failover.record
    metrics = runtime.metrics
    async with reservation:
        for endpoint in failover:
            with endpoint.serving():
                events = runtime.dispatcher(endpoint).stream(endpoint, op, _payload(body, endpoint, model))
                try:
                    first = await anext(events, b"")
                except BackendFailure as exc:
                    failover.failed(endpoint, exc)
                    continue
                reservation.started = True
                if metrics is not None:
                    metrics.streams_open += 1
                finished = False
                try:
                    yield b""
                    if first:
                        record.ttft = perf_counter() - record.started
                        yield for_client(first, record)
                    async for event in events:
                        if record.ttft is None:
                            record.ttft = perf_counter() - record.started
                        event = for_client(event, record)
                        if event:
                            yield event
                    finished = True
                    endpoint.record_success(perf_counter() - record.started, record.completion_tokens)
                except BackendFailure as exc:
                    # The 200 and some events are already with the client: say what happened in-band, then end.
                    finished = True
                    log.warning("stream for request %s broke off: %s", record.request_id, exc)
                    _record(endpoint, exc)
                    error = client_error(exc, model)
                    record.error_code = error.code
                    yield stream_error_event(op, error)
                finally:
                    if not finished:
                        record.error_code = "client_disconnected"
                    if metrics is not None:
                        metrics.streams_open -= 1
                    await events.aclose()  # type: ignore[attr-defined]
                return
        raise failover.error()


async def _infer(request: Request, op: str) -> Response:
    runtime: Runtime = request.app.state.runtime
    record = record_of(request)
    identity = await authenticate(request)
    record.user = identity.username
    server = runtime.config.server
    body = await read_json(request, server.max_body_bytes, server.max_json_depth)
    record.request_id, record.op = request_id(request), op
    named = body.get("model") if isinstance(body, dict) else None
    if isinstance(named, str):
        # Named before the checks, so that a request they refuse (bad parameters, an unknown or forbidden model)
        # has its row in the usage log and counts among the user's errors. Names no endpoint serves share one
        # label: any string a caller sends must not become a metric series of its own.
        record.model = named if runtime.registry.serves(named) else UNKNOWN_MODEL
    model = validate(op, body, runtime.config.request_bounds)
    record.stream = bool(body.get("stream"))
    params = request.path_params
    cluster = params.get("cluster")
    candidates = offering(runtime.registry.candidates(model, identity, cluster, params.get("framework")), op)
    if runtime.config.logging.log_prompts:
        record.prompt = body.get("messages") or body.get("prompt") or body.get("input")
    failover = _Failover(_route(runtime, candidates, model, cluster_route=cluster is not None), op, model, record)
    reservation = Reserved(runtime.limiter, record, identity.username, model, op, body)
    if not record.stream:
        return await _whole(runtime, failover, body, reservation)
    # Every stream asks for usage, to count its tokens; a client that did not ask gets its stream without it. The
    # APIs with their own events (Responses, Messages) report usage unasked, and their streams pass unchanged.
    record.keep_usage = asks_for_usage(body) or op in OWN_USAGE_EVENTS
    events = _streamed(runtime, failover, body if record.keep_usage else with_usage(body), reservation)
    await anext(events)
    return EventStream(events, headers=_STREAM_HEADERS)


def _operation(op: str) -> Handler:
    """The route handler of ``op``: every inference route differs only in its operation."""

    async def handler(request: Request) -> Response:
        return await _infer(request, op)

    handler.__name__ = handler.__qualname__ = op.replace("/", "_")
    return api_handler(handler)


chat_completions = _operation("chat/completions")
completions = _operation("completions")
embeddings = _operation("embeddings")
responses = _operation("responses")
# Anthropic's Messages API: its errors in Anthropic's shape, its key in x-api-key.
messages = anthropic_errors(_operation("messages"))
count_tokens = anthropic_errors(_operation("messages/count_tokens"))
rerank = _operation("rerank")
score = _operation("score")
tokenize = _operation("tokenize")
detokenize = _operation("detokenize")
