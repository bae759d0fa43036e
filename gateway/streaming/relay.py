"""The relay contract, and the relay for one gateway process.

The waiting side calls ``open`` and reads its ``Inbox``; the route that a worker posts to calls ``receive`` with the
request's body. ``receive`` refuses with a ``RelayRefused`` (its status is the HTTP answer) before reading a byte:

- 404: no such stream (never opened here, or so long ago it was forgotten);
- 401: the token is not this stream's, or it expired;
- 409: the stream was already received (tokens are single-use);
- 410: nobody waits for the stream any more (the client went away), also while the body is being read.

Chunks reach the inbox as they arrive, then ``Ending.COMPLETE`` when the body ended, or ``Ending.BROKEN`` when the
worker's connection broke off first.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import os
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from gateway.config import RelaySettings
from gateway.streaming.tokens import StreamTokens

STREAM_PATH = "/resource_server/internal/streams"
# Ended streams are remembered until their token expires, so that a replay gets 409 rather than 404.
_PRUNE_EVERY = 60.0


def stream_url(relay_url: str, stream_id: str) -> str:
    """Where a worker posts the stream ``stream_id`` on the gateway reached at ``relay_url``."""
    return f"{relay_url}{STREAM_PATH}/{stream_id}"


class Ending(enum.Enum):
    """How the worker's request body ended."""

    COMPLETE = "complete"
    BROKEN = "broken"


Item = bytes | Ending | asyncio.Future[Any]


class RelayRefused(Exception):
    """A worker's stream request that the relay turns away; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class SenderGone(Exception):
    """The worker's connection closed before its request body ended."""


class Inbox:
    """The waiting side of one stream: the chunks in the order they were written, then how the stream ended.

    The dispatcher drops its task here too when the task finishes (``put(task)``), so one ``get`` waits for both.
    ``close`` tells the relay that nobody waits any more. One reader at a time.

    Every event of every stream through a worker passes here, so a ``get`` costs no more than it must: a deque and
    one future instead of a queue's bookkeeping, and a silence limit that moves a deadline instead of arming and
    cancelling a timer per event (which took a tenth of the gateway's event loop at 128 streams).
    """

    def __init__(self, stream_id: str, token: str, expires: float, on_close: Callable[[Inbox], None]) -> None:
        self.stream_id = stream_id
        self.token = token
        self.expires = expires
        self._items: collections.deque[Item] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._alarm: asyncio.TimerHandle | None = None
        self._on_close = on_close
        self._also: list[Callable[[Inbox], None]] = []
        self.closed = False

    def put(self, item: Item) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, patience: float | None = None) -> Item:
        """The next item; ``TimeoutError`` when none comes within ``patience`` seconds (None: wait as long as it
        takes)."""
        while not self._items:
            loop = asyncio.get_running_loop()
            if patience is not None:
                self._deadline = loop.time() + patience
                # The alarm rings at the earliest deadline set since it was armed, and moves itself on from there.
                if self._alarm is None or self._alarm.when() > self._deadline:
                    if self._alarm is not None:
                        self._alarm.cancel()
                    self._alarm = loop.call_at(self._deadline, self._ring)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def joined(self, first: bytes) -> bytes:
        """``first`` with the chunks queued right behind it: a reader that fell behind writes them on at once, one
        write to its client instead of one each, so that under load each event costs less, not more."""
        items = self._items
        if not items or items[0].__class__ is not bytes:
            return first
        parts = [first]
        while items and items[0].__class__ is bytes:
            parts.append(items.popleft())  # type: ignore[arg-type]
        return b"".join(parts)

    def _ring(self) -> None:
        self._alarm = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next ``get`` sets its own deadline
        loop = waiter.get_loop()
        if loop.time() >= self._deadline:
            self._waiter = None
            waiter.set_exception(TimeoutError())
        else:
            self._alarm = loop.call_at(self._deadline, self._ring)

    def when_closed(self, callback: Callable[[Inbox], None]) -> None:
        """Call ``callback(inbox)`` too when the stream is given up (a node channel that carries it)."""
        self._also.append(callback)

    def close(self) -> None:
        """Give the stream up; synchronous, so it also works in a cancelled task's cleanup."""
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        if not self.closed:
            self.closed = True
            self._on_close(self)
            for callback in self._also:
                callback(self)


class Relay(ABC):
    """Carries each stream from the worker's request to the inbox of the gateway that waits for it."""

    tokens: StreamTokens

    @abstractmethod
    async def open(self, ttl: float) -> Inbox:
        """A new stream, with its id and a token valid for ``ttl`` seconds."""

    @abstractmethod
    async def receive(self, stream_id: str, token: str, body: AsyncIterator[bytes]) -> None:
        """Copy ``body`` into the stream's inbox until it ends; raises ``RelayRefused`` (see the module docstring).

        ``body`` raises ``SenderGone`` when the worker's connection breaks.
        """

    async def start(self) -> None:
        """Connect; called once when the gateway starts."""

    async def close(self) -> None:
        """Disconnect; called once when the gateway stops."""


def build_relay(settings: RelaySettings) -> Relay:
    """The relay ``settings`` ask for: through Redis when it has a URL, in this process otherwise."""
    secret = os.environ.get(settings.secret_env, "").encode() or None
    redis_url = settings.resolved_redis_url()
    if redis_url:
        from gateway.streaming.redis import RedisRelay

        return RedisRelay(redis_url, settings.redis_prefix, secret)
    return LocalRelay(secret or secrets.token_bytes(32))


@dataclass(eq=False)
class _Open:
    inbox: Inbox
    gone: asyncio.Future[None]
    claimed: bool = False


class LocalRelay(Relay):
    """The relay of a single gateway process: the route and the waiting request share a queue."""

    def __init__(self, secret: bytes) -> None:
        self.tokens = StreamTokens(secret)
        self._open: dict[str, _Open] = {}
        # Ended streams: id -> (token expiry, whether a worker had claimed it).
        self._ended: dict[str, tuple[float, bool]] = {}
        self._next_prune = 0.0

    async def open(self, ttl: float) -> Inbox:
        now = time.time()
        if now >= self._next_prune:
            self._ended = {key: value for key, value in self._ended.items() if value[0] >= now}
            self._next_prune = now + _PRUNE_EVERY
        stream_id = secrets.token_urlsafe(16)
        expires = now + ttl
        inbox = Inbox(stream_id, self.tokens.issue(stream_id, expires), expires, self._closed)
        self._open[stream_id] = _Open(inbox, asyncio.get_running_loop().create_future())
        return inbox

    def _closed(self, inbox: Inbox) -> None:
        stream = self._open.pop(inbox.stream_id, None)
        if stream is not None:
            stream.gone.set_result(None)
            self._ended[inbox.stream_id] = (inbox.expires, stream.claimed)

    async def receive(self, stream_id: str, token: str, body: AsyncIterator[bytes]) -> None:
        stream = self._open.get(stream_id)
        ended = self._ended.get(stream_id)
        if stream is None and ended is None:
            raise RelayRefused(404, "stream_not_found", "No such stream; it ended long ago or never began here.")
        if not self.tokens.verify(stream_id, token):
            raise RelayRefused(401, "invalid_stream_token", "The stream token is invalid or has expired.")
        if stream is None:
            assert ended is not None
            if ended[1]:
                raise RelayRefused(409, "stream_already_received", "This stream was already received.")
            self._ended[stream_id] = (ended[0], True)
            raise RelayRefused(410, "stream_abandoned", "Nobody waits for this stream any more.")
        if stream.claimed:
            raise RelayRefused(409, "stream_already_received", "This stream was already received.")
        stream.claimed = True
        pump = asyncio.ensure_future(_pump(body, stream.inbox))
        try:
            await asyncio.wait((pump, stream.gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pump.done():
                pump.cancel()
        if not pump.done():
            raise RelayRefused(410, "stream_abandoned", "Nobody waits for this stream any more.")
        pump.result()


async def _pump(body: AsyncIterator[bytes], inbox: Inbox) -> None:
    try:
        async for chunk in body:
            inbox.put(chunk)
    except SenderGone:
        inbox.put(Ending.BROKEN)
        return
    inbox.put(Ending.COMPLETE)
