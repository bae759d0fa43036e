"""Answers of the compute functions that come back through the relay: the task runs on a worker, its events come here.

``relayed_events`` waits for the events of a task that holds its worker until the answer ends (``globus``);
``relayed_outcome`` for those of a request served by the node's request server, whole answers too (``parsl``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson

from gateway.dispatch.base import BackendFailure, BackendProtocolError, BackendTimeout
from gateway.dispatch.compute import streamed_count, taken
from gateway.dispatch.sse import EventSplitter
from gateway.federation.registry import Endpoint
from gateway.streaming.relay import Ending, Inbox, Relay, stream_url

# How long to wait, once the worker's request has ended, for its task's result (or for the last events, when they
# come through Redis), before calling the stream broken. A dead worker's task fails only after Parsl's heartbeat.
GRACE = 2.0


def _outcome(endpoint: Endpoint, task: asyncio.Future[Any]) -> Any:
    if task.cancelled():
        raise BackendProtocolError(endpoint, "the task was cancelled")
    error = task.exception()
    if error is None:
        return task.result()
    if isinstance(error, BackendFailure):
        raise error
    raise BackendProtocolError(endpoint, f"the worker failed: {error.__class__.__name__}: {error}")


async def relayed_events(
    endpoint: Endpoint,
    relay: Relay,
    relay_url: str,
    run: Callable[[dict[str, str]], Awaitable[Any]],
    *,
    wait: float,
    idle: float,
) -> AsyncGenerator[bytes, None]:
    """The SSE events of one streaming ``inference`` task, as its worker writes them to the relay.

    ``run(stream)`` submits the task with ``stream`` (``{"url", "token"}``) as the request's ``stream`` and returns
    the task's result; the transport's typed failures propagate. ``wait`` bounds the time to the first chunk (the
    model server may have to start first), ``idle`` the silence between chunks. The stream ends with the worker's
    request; a worker that dies mid-stream ends it with a ``BackendProtocolError`` within ``GRACE`` seconds.
    """
    inbox = await relay.open(ttl=wait)
    task = asyncio.ensure_future(run({"url": stream_url(relay_url, inbox.stream_id), "token": inbox.token}))
    task.add_done_callback(inbox.put)
    events = EventSplitter()
    ended: Ending | None = None
    limit = wait
    try:
        while True:
            try:
                async with asyncio.timeout(limit):
                    item = await inbox.get()
            except TimeoutError:
                if ended is Ending.COMPLETE:
                    return
                if ended is Ending.BROKEN:
                    raise BackendProtocolError(endpoint, "the worker's stream broke off") from None
                raise BackendTimeout(endpoint, "no events from the worker in time") from None
            if isinstance(item, bytes):
                complete = events.feed(item)
                if complete:
                    yield complete
                limit = idle
            elif isinstance(item, Ending):
                if item is Ending.COMPLETE and events.inside_event:
                    raise BackendProtocolError(endpoint, "the stream ended inside an event")
                if item is Ending.COMPLETE and (events.saw_done or task.done()):
                    return
                ended, limit = item, GRACE
            else:
                # The task's result: a failure it reports is raised here, before or after the first event.
                streamed_count(endpoint, _outcome(endpoint, item))
                if ended is Ending.COMPLETE:
                    return
                if ended is Ending.BROKEN:
                    raise BackendProtocolError(endpoint, "the worker's stream broke off")
                limit = GRACE
    finally:
        inbox.close()
        if not task.done():
            task.cancel()


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
) -> AsyncGenerator[bytes | dict[str, Any], None]:
    """The SSE events of one ``inference`` request served by a node's request server, then its outcome (a dict).

    ``run(stream, inbox)`` submits the task with ``stream`` as the request's ``stream`` and returns its result, which
    only says that the request server took the request (or why it did not); or sends the request down a node
    channel, which feeds ``inbox`` as a relay request would. The server's one relay request carries the
    events and ends with the outcome; a relay request that ends without it (a server that died) is a
    ``BackendProtocolError``. ``wait`` and ``idle`` bound the silences as in ``relayed_events``.
    """
    inbox = await relay.open(ttl=wait)
    task = asyncio.ensure_future(run({"url": stream_url(relay_url, inbox.stream_id), "token": inbox.token}, inbox))
    task.add_done_callback(inbox.put)
    events = EventSplitter()
    limit = wait
    try:
        while True:
            try:
                async with asyncio.timeout(limit):
                    item = await inbox.get()
            except TimeoutError:
                raise BackendTimeout(endpoint, "no events from the worker in time") from None
            if isinstance(item, bytes):
                complete = events.feed(item)
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
        if not task.done():
            task.cancel()
