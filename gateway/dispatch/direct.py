"""The ``direct`` transport: plain HTTP to an OpenAI-compatible server, one connection pool per endpoint."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import orjson

from backend_http.client import ConnectionBroken, Http, Reply, ServerUnreachable
from compute_functions.metrics import model_load
from compute_functions.routes import path_of
from gateway.dispatch.base import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    Dispatcher,
)
from gateway.dispatch.sse import EventSplitter
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint


class DirectDispatcher(Dispatcher):
    """Sends each request straight to the endpoint's ``base_url``."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._clients: dict[str, Http] = {}

    def _client(self, endpoint: Endpoint) -> Http:
        client = self._clients.get(endpoint.id)
        if client is None:
            # The caller's own token is never forwarded: the backend gets the endpoint's key or nothing.
            key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
            client = Http(
                endpoint.base_url,
                {"authorization": f"Bearer {key}"} if key else {},
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
                max_connections=endpoint.max_connections,
            )
            self._clients[endpoint.id] = client
        return client

    async def _post(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> Reply:
        try:
            client = self._client(endpoint)
            return await client.request("POST", path_of(op, client.prefix), orjson.dumps(payload))
        except ServerUnreachable as exc:
            raise BackendUnavailable(endpoint, f"cannot connect: {exc}") from None
        except TimeoutError:
            raise BackendTimeout(endpoint, "no answer in time") from None
        except OSError as exc:
            raise BackendUnavailable(endpoint, f"connection failed: {exc}") from None

    async def call(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        reply = await self._post(endpoint, op, payload)
        try:
            body = await reply.read()
        except TimeoutError:
            raise BackendTimeout(endpoint, "answer not finished in time") from None
        except ConnectionBroken as exc:
            raise BackendProtocolError(endpoint, f"answer broken off: {exc}") from None
        finally:
            reply.close()
        if reply.status >= 400:
            raise BackendError(endpoint, reply.status, body)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BackendProtocolError(endpoint, "answer is not JSON") from None
        if not isinstance(answer, dict):
            raise BackendProtocolError(endpoint, "answer is not a JSON object")
        return answer

    async def stream(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        reply = await self._post(endpoint, op, payload)
        sent = False
        try:
            if reply.status >= 400:
                raise BackendError(endpoint, reply.status, await reply.read())
            if reply.content_type != "text/event-stream":
                raise BackendProtocolError(endpoint, f"expected an event stream, got {reply.content_type or 'nothing'}")
            events = EventSplitter()
            async for data in reply.pieces():
                complete = events.feed(data)
                if complete:
                    sent = True
                    yield complete
            if events.inside_event:
                raise BackendProtocolError(endpoint, "stream ended inside an event")
        except TimeoutError:
            raise BackendTimeout(endpoint, "stream stalled") from None
        except ConnectionBroken as exc:
            if not sent:
                # Nothing reached the client yet, so another endpoint may still serve the request.
                raise BackendUnavailable(endpoint, f"connection lost before the first event: {exc}") from None
            raise BackendProtocolError(endpoint, f"stream broken off: {exc}") from None
        finally:
            reply.close()

    async def status(self, endpoint: Endpoint) -> Availability:
        """Hot when the server lists the endpoint's models; load from vLLM's metrics when it exports them."""
        client = self._client(endpoint)
        try:
            status, body = await self._get(client, "models")
            if status != 200:
                # It answers, so it is reachable; without a model list nothing more can be said.
                return Availability("unknown", detail=f"/models answered HTTP {status}")
            listed = orjson.loads(body)
            entries = [entry for entry in listed.get("data", []) if isinstance(entry, dict)]
            names = {entry.get("id") for entry in entries}
            simulated = any(entry.get("simulated") is True for entry in entries)
            missing = frozenset(model for model in endpoint.models if endpoint.backend_model(model) not in names)
            if len(missing) == len(endpoint.models):
                return Availability("cold", detail="no model loaded")
            detail = f"not loaded: {', '.join(sorted(missing))}" if missing else ""
            if endpoint.kind == "openai":
                return Availability("hot", detail=detail, cold_models=missing)
            status, body = await self._get(client, "/metrics")
            text = body.decode(errors="replace") if status == 200 else ""
        except ServerUnreachable as exc:
            return Availability("offline", detail=str(exc))
        except (OSError, TimeoutError, ValueError, AttributeError) as exc:
            return Availability("offline", detail=f"status failed: {exc.__class__.__name__}")
        loads = model_load(text)
        served = [loads[name] for name in {endpoint.backend_model(model) for model in endpoint.models} if name in loads]
        if not served:
            return Availability("hot", detail=detail, cold_models=missing, simulated=simulated)
        return Availability(
            "hot",
            detail=detail,
            cold_models=missing,
            simulated=simulated,
            running=sum(load.running for load in served),
            waiting=sum(load.waiting for load in served),
        )

    @staticmethod
    async def _get(client: Http, path: str) -> tuple[int, bytes]:
        reply = await client.request("GET", path)
        try:
            return reply.status, await reply.read()
        finally:
            reply.close()

    async def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
