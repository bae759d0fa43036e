"""The dispatch contract.

A ``Dispatcher`` carries one operation (``chat/completions``, ``completions``,
``embeddings``, ``responses``, ``messages``, ...: ``OPERATIONS``) to an
``Endpoint`` and brings the answer back:

- ``await call(endpoint, op, payload)`` returns the whole answer as a dict;
- ``stream(endpoint, op, payload)`` is an async iterator of complete SSE events
  (bytes, each ending in a blank line), exactly as the backend wrote them.

Failures are typed so the API layer can pick the status code and federation can
fail over: ``BackendUnavailable`` (nothing answered: connection refused, reset
before any byte), ``BackendTimeout``, ``BackendError`` (the backend answered
with an error status; its body is attached) and ``BackendProtocolError`` (the
backend answered something that is not the protocol, or broke off mid-answer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from compute_functions.routes import OPERATIONS as OPERATIONS
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint


class BackendFailure(Exception):
    """Base of the dispatch errors; ``endpoint`` names the backend that failed."""

    def __init__(self, endpoint: Endpoint, detail: str) -> None:
        super().__init__(f"{endpoint.id}: {detail}")
        self.endpoint = endpoint
        self.detail = detail


class BackendUnavailable(BackendFailure):
    """Nothing answered: the request never reached a working backend, so it may be retried elsewhere."""


class BackendTimeout(BackendFailure):
    """The backend did not answer in time."""


class BackendProtocolError(BackendFailure):
    """The backend's answer was not the protocol, or it stopped in the middle of one."""


class BackendError(BackendFailure):
    """The backend answered with an error status."""

    def __init__(self, endpoint: Endpoint, status: int, body: bytes) -> None:
        super().__init__(endpoint, f"answered HTTP {status}")
        self.status = status
        self.body = body


class Dispatcher(ABC):
    """Carries requests to the endpoints of one transport; see the module docstring."""

    @abstractmethod
    async def call(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def stream(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> AsyncIterator[bytes]: ...

    async def status(self, endpoint: Endpoint) -> Availability:
        """What ``endpoint`` can do now. Called by the availability tracker, never on the request path."""
        return Availability("unknown", detail="this transport reports no status")

    async def start(self) -> None:
        """Open pools and executors; called once when the gateway starts."""

    async def close(self) -> None:
        """Close pools and executors; called once when the gateway stops."""

    async def check(self) -> str | None:
        """Why this transport cannot take requests now (an executor down, say), or None; for the readiness probe."""
        return None
