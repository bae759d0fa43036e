"""The relay for several gateway replicas: a worker's request may reach any replica, the events go through Redis.

Under the configured prefix:

    stream:{id}   key, set when a replica opens the stream (it outlives the token by a few minutes)
    claim:{id}    key, set (NX) by the replica that receives the worker's request: tokens are single-use
    gone:{id}     key and channel, set and published when the waiting replica gives the stream up
    data:{id}     channel the waiting replica listens on: b"d" + chunk, then b"e" (complete) or b"x" (broken)
    secret        the token key, when the replicas are not given one in the environment

Each replica holds one pub/sub connection for all its streams; publishing a chunk is one round trip, so events
are relayed as they arrive, with no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from gateway.streaming.relay import Ending, Inbox, Item, Relay, RelayRefused, SenderGone
from gateway.streaming.tokens import StreamTokens

log = logging.getLogger("gateway.streaming")

_SUBSCRIBE_TIMEOUT = 5.0
# A stream is known for this long past its token's expiry, so that a late worker hears 401 rather than 404.
_REMEMBERED = 300


def _frame(data: bytes) -> Item:
    kind, payload = data[:1], data[1:]
    if kind == b"d":
        return payload
    return Ending.COMPLETE if kind == b"e" else Ending.BROKEN


class RedisRelay(Relay):
    """Streams through Redis pub/sub; see the module docstring."""

    def __init__(self, url: str, prefix: str, secret: bytes | None) -> None:
        self._url = url
        self._prefix = prefix
        self._secret = secret
        self._redis: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._handlers: dict[bytes, Callable[[bytes], None]] = {}
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    def _name(self, kind: str, stream_id: str) -> str:
        return f"{self._prefix}{kind}:{stream_id}"

    async def start(self) -> None:
        import redis.asyncio

        self._redis = redis.asyncio.Redis.from_url(self._url)
        if self._secret is None:
            await self._redis.set(f"{self._prefix}secret", secrets.token_hex(32), nx=True)
            self._secret = await self._redis.get(f"{self._prefix}secret")
        assert self._secret is not None
        self.tokens = StreamTokens(self._secret)
        self._pubsub = self._redis.pubsub()
        # A subscription for the relay's whole life: redis-py's reader returns at once while there is none.
        await self._pubsub.subscribe(f"{self._prefix}replica:{secrets.token_hex(8)}")
        self._reader = asyncio.create_task(self._read(), name="relay-redis-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def _read(self) -> None:
        while True:
            try:
                async for message in self._pubsub.listen():
                    channel = message["channel"]
                    if message["type"] == "message":
                        handler = self._handlers.get(channel)
                        if handler is not None:
                            handler(message["data"])
                    elif message["type"] == "subscribe":
                        confirmed = self._confirmations.pop(channel, None)
                        if confirmed is not None and not confirmed.done():
                            confirmed.set_result(None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Streams in flight lose their events and time out; new ones work once Redis is back.
                log.warning("relay lost its Redis subscription (%s); reconnecting", exc)
                await asyncio.sleep(1.0)

    async def _subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Listen on ``channel``; returns once Redis confirmed it, so nothing published after is missed."""
        key = channel.encode()
        self._handlers[key] = handler
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[key] = confirmed
        await self._pubsub.subscribe(channel)
        await asyncio.wait_for(confirmed, _SUBSCRIBE_TIMEOUT)

    def _unsubscribe(self, channel: str) -> None:
        self._handlers.pop(channel.encode(), None)
        self._in_background(self._pubsub.unsubscribe(channel))

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def open(self, ttl: float) -> Inbox:
        stream_id = secrets.token_urlsafe(16)
        expires = time.time() + ttl
        inbox = Inbox(stream_id, self.tokens.issue(stream_id, expires), expires, self._closed)
        await self._subscribe(self._name("data", stream_id), lambda data: inbox.put(_frame(data)))
        await self._redis.set(self._name("stream", stream_id), b"1", ex=math.ceil(ttl) + _REMEMBERED)
        return inbox

    def _closed(self, inbox: Inbox) -> None:
        self._unsubscribe(self._name("data", inbox.stream_id))
        self._in_background(self._give_up(inbox))

    async def _give_up(self, inbox: Inbox) -> None:
        ttl = max(1, math.ceil(inbox.expires - time.time()))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._name("gone", inbox.stream_id), b"1", ex=ttl)
            pipe.publish(self._name("gone", inbox.stream_id), b"")
            await pipe.execute()

    async def receive(self, stream_id: str, token: str, body: AsyncIterator[bytes]) -> None:
        if not await self._redis.exists(self._name("stream", stream_id)):
            raise RelayRefused(404, "stream_not_found", "No such stream; it ended long ago or never began.")
        if not self.tokens.verify(stream_id, token):
            raise RelayRefused(401, "invalid_stream_token", "The stream token is invalid or has expired.")
        ttl = max(1, math.ceil(int(token.partition(".")[0]) - time.time()))
        if not await self._redis.set(self._name("claim", stream_id), b"1", nx=True, ex=ttl):
            raise RelayRefused(409, "stream_already_received", "This stream was already received.")
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        gone_channel = self._name("gone", stream_id)

        def given_up(_: bytes) -> None:
            if not gone.done():
                gone.set_result(None)

        await self._subscribe(gone_channel, given_up)
        pump: asyncio.Future[bool] | None = None
        try:
            if await self._redis.exists(gone_channel):
                raise RelayRefused(410, "stream_abandoned", "Nobody waits for this stream any more.")
            pump = asyncio.ensure_future(self._pump(body, self._name("data", stream_id)))
            await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done() or not pump.result():
                raise RelayRefused(410, "stream_abandoned", "Nobody waits for this stream any more.")
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
            self._unsubscribe(gone_channel)

    async def _pump(self, body: AsyncIterator[bytes], channel: str) -> bool:
        """Publish ``body``'s chunks; False when no replica listens any more."""
        try:
            async for chunk in body:
                if not await self._redis.publish(channel, b"d" + chunk):
                    return False
        except SenderGone:
            await self._redis.publish(channel, b"x")
            return True
        await self._redis.publish(channel, b"e")
        return True
