"""Answers of the compute functions that come back through the relay: the task runs on a worker, its events come here.

``relayed_outcome`` waits for the events of a request served by a node's request server, whole answers too, and its
outcome; ``whole_answer`` and ``streamed_events`` make of them what ``Dispatcher.call`` and ``Dispatcher.stream``
return (``parsl`` and ``globus``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from gateway.dispatch.base import BackendFailure, BackendProtocolError, BackendTimeout
from gateway.dispatch.compute import answer_of, streamed_count, taken
from gateway.dispatch.sse import EventSplitter
from gateway.federation.registry import Endpoint
from gateway.streaming.relay import Ending, Inbox, Relay, stream_url

log = logging.getLogger("gateway.dispatch")

# How long a ``status`` task may wait behind the requests when every worker is busy; the tracker gives a probe 5 s.
STATUS_LIMIT = 3.0

Items = AsyncGenerator[bytes | dict[str, Any], None]


def logged(endpoint: Endpoint, result: Any) -> Any:
    """``result``, after logging a failure the client will not see in full (a model server that did not start)."""
    error = result.get("error") if isinstance(result, dict) else None
    if isinstance(error, dict) and error.get("kind") not in ("upstream", "cancelled"):
        log.warning("%s: %s: %s", endpoint.id, error.get("kind"), error.get("message"))
    return result


async def whole_answer(endpoint: Endpoint, items: Items) -> dict[str, Any]:
    """The model server's whole answer from a request's relayed items (see ``relayed_outcome``)."""
    async with contextlib.aclosing(items):
        async for item in items:
            if isinstance(item, dict):
                return answer_of(endpoint, logged(endpoint, item))
    raise BackendProtocolError(endpoint, "the worker's answer ended without its outcome")


async def streamed_events(endpoint: Endpoint, relayed: Callable[[], Items]) -> AsyncIterator[bytes]:
    """The SSE events of the relayed items that ``relayed()`` gives, their outcome checked (see ``relayed_outcome``).

    ``relayed`` is called on the first step, so that what it raises (a ``BackendFailure``) comes from iterating, as
    the failover expects of a stream.
    """
    items = relayed()
    async with contextlib.aclosing(items):
        async for item in items:
            if isinstance(item, bytes):
                yield item
            else:
                streamed_count(endpoint, logged(endpoint, item))


def _outcome(endpoint: Endpoint, task: asyncio.Future[Any]) -> Any:
    if task.cancelled():
        raise BackendProtocolError(endpoint, "the task was cancelled")
    error = task.exception()
    if error is None:
        return task.result()
    if isinstance(error, BackendFailure):
        raise error
    raise BackendProtocolError(endpoint, f"the worker failed: {error.__class__.__name__}: {error}")


# The last event of a request served by a request server: its outcome, which the task's result does not carry.
_OUTCOME = b"event: outcome\ndata: "


async def relayed_outcome(
    endpoint: Endpoint,
    relay: Relay,
    relay_url: str,
    run: Callable[[dict[str, str], Inbox], Awaitable[Any]],
    *,
    wait: float,
    idle: float,
    offer: Callable[[Inbox], Awaitable[bool]] | None = None,
) -> AsyncGenerator[bytes | dict[str, Any], None]:
    """The SSE events of one ``inference`` request served by a node's request server, then its outcome (a dict).

    ``run(stream, inbox)`` submits the task with ``stream`` as the request's ``stream`` and returns its result, which
    only says that the request server took the request (or why it did not); or sends the request down a node
    channel, which feeds ``inbox`` as a relay request would. The server's one relay request carries the
    events and ends with the outcome; a relay request that ends without it (a server that died) is a
    ``BackendProtocolError``. ``wait`` bounds the time to the first event (the model server may have to start
    first), ``idle`` the silence between events.

    ``offer(inbox)``, when given, is awaited first, in this task: True when it sent the request down a node channel,
    so that no ``run`` task is needed. A task's first step would wait a turn of the event loop, which under load
    is a millisecond or more before the request leaves.
    """
    inbox = await relay.open(ttl=wait)
    task: asyncio.Future[Any] | None = None
    events = EventSplitter()
    limit = wait
    try:
        if offer is None or not await offer(inbox):
            stream = {"url": stream_url(relay_url, inbox.stream_id), "token": inbox.token}
            task = asyncio.ensure_future(run(stream, inbox))
            task.add_done_callback(inbox.put)
        while True:
            try:
                item = await inbox.get(limit)
            except TimeoutError:
                raise BackendTimeout(endpoint, "no events from the worker in time") from None
            if isinstance(item, bytes):
                complete = events.feed(inbox.joined(item))
                limit = idle
                if not complete:
                    continue
                at = complete.find(_OUTCOME)
                # Events are whole here, so the outcome starts the chunk or follows a blank line.
                while at > 0 and complete[at - 2 : at] != b"\n\n":
                    at = complete.find(_OUTCOME, at + 1)
                if at < 0:
                    yield complete
                    continue
                if at > 0:
                    yield complete[:at]
                try:
                    outcome = orjson.loads(complete[at + len(_OUTCOME) :].split(b"\n", 1)[0])
                except orjson.JSONDecodeError:
                    raise BackendProtocolError(endpoint, "the worker's outcome is not JSON") from None
                yield outcome
                return
            if isinstance(item, Ending):
                if item is Ending.COMPLETE:
                    raise BackendProtocolError(endpoint, "the worker's stream ended without its outcome")
                raise BackendProtocolError(endpoint, "the worker's stream broke off")
            # The task's result: a failure before the request server took the request is raised; else wait on.
            taken(endpoint, _outcome(endpoint, item))
    finally:
        inbox.close()
        if task is not None and not task.done():
            task.cancel()
