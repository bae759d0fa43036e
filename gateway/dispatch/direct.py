"""The ``direct`` transport: plain HTTP to an OpenAI-compatible server, one connection pool per endpoint."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from compute_functions.metrics import model_load
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

_JSON = {"content-type": "application/json"}


class DirectDispatcher(Dispatcher):
    """Sends each request straight to the endpoint's ``base_url``."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._headers: dict[str, dict[str, str]] = {}

    def _session(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        session = self._sessions.get(endpoint.base_url)
        if session is None:
            connector = aiohttp.TCPConnector(limit=endpoint.max_connections, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                skip_auto_headers=("User-Agent",),
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
            self._sessions[endpoint.base_url] = session
        return session

    def _request_headers(self, endpoint: Endpoint) -> dict[str, str]:
        headers = self._headers.get(endpoint.id)
        if headers is None:
            headers = dict(_JSON)
            # The caller's own token is never forwarded: the backend gets the endpoint's key or nothing.
            key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
            if key:
                headers["authorization"] = f"Bearer {key}"
            self._headers[endpoint.id] = headers
        return headers

    async def _post(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        url, body, headers = f"{endpoint.base_url}/{op}", orjson.dumps(payload), self._request_headers(endpoint)
        session = self._session(endpoint)
        try:
            try:
                return await session.post(url, data=body, headers=headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A pooled keep-alive connection the server had already closed (servers drop idle ones): the
                # request never reached it, so it goes again once, on a new connection.
                return await session.post(url, data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            raise BackendUnavailable(endpoint, f"cannot connect: {exc.__class__.__name__}") from None
        except TimeoutError:
            raise BackendTimeout(endpoint, "no answer in time") from None
        except aiohttp.ClientError as exc:
            raise BackendUnavailable(endpoint, f"connection failed: {exc.__class__.__name__}") from None

    async def call(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = await self._post(endpoint, op, payload)
        try:
            body = await response.read()
        except TimeoutError:
            raise BackendTimeout(endpoint, "answer not finished in time") from None
        except aiohttp.ClientError as exc:
            raise BackendProtocolError(endpoint, f"answer broken off: {exc.__class__.__name__}") from None
        finally:
            response.release()
        if response.status >= 400:
            raise BackendError(endpoint, response.status, body)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BackendProtocolError(endpoint, "answer is not JSON") from None
        if not isinstance(answer, dict):
            raise BackendProtocolError(endpoint, "answer is not a JSON object")
        return answer

    async def stream(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        response = await self._post(endpoint, op, payload)
        finished = sent = False
        try:
            if response.status >= 400:
                raise BackendError(endpoint, response.status, await response.read())
            if not response.content_type.startswith("text/event-stream"):
                raise BackendProtocolError(endpoint, f"expected an event stream, got {response.content_type}")
            events = EventSplitter()
            async for data in response.content.iter_any():
                complete = events.feed(data)
                if complete:
                    sent = True
                    yield complete
            finished = True
            if events.inside_event:
                raise BackendProtocolError(endpoint, "stream ended inside an event")
        except TimeoutError:
            raise BackendTimeout(endpoint, "stream stalled") from None
        except aiohttp.ClientError as exc:
            if not sent:
                # Nothing reached the client yet, so another endpoint may still serve the request.
                raise BackendUnavailable(
                    endpoint, f"connection lost before the first event: {exc.__class__.__name__}"
                ) from None
            raise BackendProtocolError(endpoint, f"stream broken off: {exc.__class__.__name__}") from None
        finally:
            if finished:
                response.release()
            else:
                response.close()

    async def status(self, endpoint: Endpoint) -> Availability:
        """Hot when the server lists the endpoint's models; load from vLLM's metrics when it exports them."""
        session = self._session(endpoint)
        headers = self._request_headers(endpoint)
        try:
            async with session.get(f"{endpoint.base_url}/models", headers=headers) as answer:
                if answer.status != 200:
                    # It answers, so it is reachable; without a model list nothing more can be said.
                    return Availability("unknown", detail=f"/models answered HTTP {answer.status}")
                listed = await answer.json(loads=orjson.loads, content_type=None)
            names = {entry.get("id") for entry in listed.get("data", []) if isinstance(entry, dict)}
            missing = frozenset(model for model in endpoint.models if endpoint.backend_model(model) not in names)
            if len(missing) == len(endpoint.models):
                return Availability("cold", detail="no model loaded")
            detail = f"not loaded: {', '.join(sorted(missing))}" if missing else ""
            if endpoint.kind == "openai":
                return Availability("hot", detail=detail, cold_models=missing)
            root = endpoint.base_url.removesuffix("/v1")
            async with session.get(f"{root}/metrics") as answer:
                text = await answer.text() if answer.status == 200 else ""
        except (aiohttp.ClientError, ValueError, AttributeError) as exc:
            return Availability("offline", detail=f"status failed: {exc.__class__.__name__}")
        loads = model_load(text)
        served = [loads[name] for name in {endpoint.backend_model(model) for model in endpoint.models} if name in loads]
        if not served:
            return Availability("hot", detail=detail, cold_models=missing)
        return Availability(
            "hot",
            detail=detail,
            cold_models=missing,
            running=sum(load.running for load in served),
            waiting=sum(load.waiting for load in served),
        )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
