"""What the gateway learns about one request while it runs."""

from __future__ import annotations

import operator
import os
import re
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from starlette.requests import Request

if TYPE_CHECKING:
    from gateway.federation.registry import Endpoint
    from gateway.limits.base import RateLimiter, Reservation

SCOPE_KEY = "gateway.record"
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


class RequestRecord:
    """One request's facts: who, what, where it went, how it ended and how much it used.

    The observing middleware makes one for every HTTP request and keeps it in the ASGI scope; the
    handlers fill it in; when the response is over, the metrics, the rate limiter, the usage log and
    the access log all read it. ``model`` is set only once the model is known to be served, which is
    what makes a request count as usage.
    """

    __slots__ = (
        "client",
        "cluster",
        "completion_tokens",
        "duration",
        "error_code",
        "framework",
        "keep_usage",
        "method",
        "model",
        "op",
        "path",
        "prompt",
        "prompt_tokens",
        "request_id",
        "route",
        "started",
        "started_at",
        "status",
        "stream",
        "transport",
        "ttft",
        "user",
    )

    def __init__(self, method: str, path: str, client: str | None) -> None:
        self.started = time.perf_counter()
        self.started_at = time.time()
        self.method = method
        self.path = path
        self.client = client
        self.status = 0
        self.request_id = ""
        self.user: str | None = None
        self.op: str | None = None
        self.model: str | None = None
        self.cluster: str | None = None
        self.framework: str | None = None
        self.transport: str | None = None
        self.stream = False
        self.keep_usage = True
        self.error_code: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.ttft: float | None = None
        self.duration = 0.0
        self.prompt: Any = None
        self.route = ""

    def sent_to(self, endpoint: Endpoint) -> None:
        self.cluster = endpoint.cluster
        self.framework = endpoint.framework
        self.transport = endpoint.transport

    def take_usage(self, usage: Any) -> None:
        """Keep the token counts of a backend's ``usage`` object, whatever else it holds."""
        if isinstance(usage, dict):
            # OpenAI's Responses and Anthropic's Messages call them input and output tokens.
            prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
            completion = usage.get("completion_tokens", usage.get("output_tokens"))
            if isinstance(prompt, int):
                self.prompt_tokens = prompt
            if isinstance(completion, int):
                self.completion_tokens = completion

    def finished(self) -> FinishedRequest:
        """The record as the usage writer gets it."""
        return FinishedRequest._make(row_of(self))

    @property
    def tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def answered(self, status: int, error_code: str | None = None) -> None:
        """Note the response's status (and its error's code) as the handler hands it over."""
        self.status = status
        if error_code is not None and self.error_code is None:
            self.error_code = error_code


class Reserved:
    """A request's rate-limit reservation, taken on entering an ``async with`` block and settled when it ends.

    Settling keeps the tokens the backend reported using (the record's usage). An answer that failed before it
    started (the block raised before ``started`` was set) gives back what no backend reported using; one that
    started and was cut off keeps its estimate, since the backend did work it did not report.
    """

    __slots__ = ("body", "limiter", "model", "op", "record", "reservation", "started", "user")

    def __init__(
        self, limiter: RateLimiter, record: RequestRecord, user: str, model: str, op: str, body: dict[str, Any]
    ) -> None:
        self.limiter = limiter
        self.record = record
        self.user = user
        self.model = model
        self.op = op
        self.body = body
        self.reservation: Reservation | None = None
        self.started = False

    async def __aenter__(self) -> Reserved:
        if self.limiter.enabled:
            self.reservation = await self.limiter.reserve(self.user, self.model, self.op, self.body)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        reservation, self.reservation = self.reservation, None
        if reservation is None:
            return
        prompt, completion = self.record.prompt_tokens, self.record.completion_tokens
        if prompt is not None or completion is not None:
            used: int | None = (prompt or 0) + (completion or 0)
        else:
            used = 0 if kind is not None and not self.started else None
        self.limiter.settle(reservation, used)


class FinishedRequest(NamedTuple):
    """A finished request's facts as plain values, in one tuple: what the usage writer process gets of its record
    (everything but what only the serving process reads), and what the usage log,
    the access log and the metrics' counts read there."""

    client: str | None
    cluster: str | None
    completion_tokens: int | None
    duration: float
    error_code: str | None
    framework: str | None
    method: str
    model: str | None
    op: str | None
    path: str
    prompt: Any
    prompt_tokens: int | None
    request_id: str
    route: str
    started_at: float
    status: int
    stream: bool
    transport: str | None
    ttft: float | None
    user: str | None


# A record's values in FinishedRequest's order, taken in C as the request ends (a plain tuple, made on every request).
row_of = operator.attrgetter(*FinishedRequest._fields)


def record_of(request: Request) -> RequestRecord:
    """The request's record; a stand-in when the app runs without the observing middleware."""
    record: RequestRecord | None = request.scope.get(SCOPE_KEY)
    if record is None:
        record = RequestRecord(request.method, request.scope["path"], None)
        request.scope[SCOPE_KEY] = record
    return record
