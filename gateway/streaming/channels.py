"""Node channels: one long-lived WebSocket per node's request server, dialled out from the node to the gateway.

A request handed over through Parsl travels through the interchange, the node's manager and a worker, and its
answer comes back in a relay request of its own: milliseconds of CPU in five processes per request. Once a Parsl
task has started a node's request server, the server dials the gateway here (``/resource_server/internal/nodes/
{channel_id}``, with a token the gateway signed with the relay's secret) and keeps the connection; the gateway then
sends the next requests down it and the server sends their events back on it, into the same ``Inbox`` a relay
request would fill. Parsl stays the way to start or find a request server, and the way in while no channel is
connected or every connected one is full.

The WebSocket messages (RFC 6455, framed by the ``websockets`` library on both ends):

- gateway to node, binary, JSON: a request for the ``inference`` compute function, whose ``stream`` is ``{"id":
  stream id}``; or ``{"cancel": stream id}`` when nobody waits for that answer any more (the node then closes its
  model server's request);
- node to gateway, text, JSON: an array of ``[stream id, piece]``, each piece the next part of that request's SSE
  events as the model server wrote them (all that the node's event loop gathered in one turn: the model server
  emits the next token of all its sequences together); the outcome event (``event: outcome``) comes last, in a
  piece of its own.

A channel that closes breaks every stream it was carrying (``Ending.BROKEN``), so a request server that dies is an
error for its clients at once, as it is with relay requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.streaming.relay import Ending, Inbox
from gateway.streaming.tokens import StreamTokens

log = logging.getLogger("gateway.streaming.channels")

CHANNEL_PATH = "/resource_server/internal/nodes"
# A channel token is checked when the node connects, not after; the token travels with each request that Parsl
# hands over while no channel is connected, so it lives long and is renewed well before it ends.
_TOKEN_TTL = 24 * 3600.0
_OUTCOME = b"event: outcome\n"


class NodeChannel:
    """One connected request server: the streams it carries, and how to send it a request."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]], capacity: int) -> None:
        self._send = send
        self.capacity = capacity
        self.streams: dict[str, Inbox] = {}
        self.closed = False
        self._sending: set[asyncio.Task[None]] = set()

    @property
    def free(self) -> int:
        return self.capacity - len(self.streams)

    async def submit(self, request: dict[str, Any], inbox: Inbox) -> None:
        """Send ``request`` (its ``stream`` names ``inbox``) down the channel; its events will reach ``inbox``."""
        key = inbox.stream_id
        self.streams[key] = inbox
        inbox.when_closed(self._given_up)
        try:
            await self._send(orjson.dumps(request))
        except BaseException:
            self.streams.pop(key, None)
            raise

    def _given_up(self, inbox: Inbox) -> None:
        # The waiting side left before the outcome: the node stops the model server's request.
        if self.streams.pop(inbox.stream_id, None) is None or self.closed:
            return
        task = asyncio.get_running_loop().create_task(self._cancel(inbox.stream_id))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _cancel(self, stream_id: str) -> None:
        # The channel may close meanwhile; its streams are broken then anyway.
        with contextlib.suppress(Exception):
            await self._send(orjson.dumps({"cancel": stream_id}))

    def received(self, message: str | bytes) -> None:
        """A message from the node: pieces of its streams' events."""
        try:
            pieces = orjson.loads(message)
        except orjson.JSONDecodeError:
            raise ValueError("a node channel's message is not JSON") from None
        for key, text in pieces:
            piece = text.encode()
            # The outcome is the stream's last piece: nothing left to cancel once it is on its way.
            inbox = self.streams.pop(key, None) if piece.startswith(_OUTCOME) else self.streams.get(key)
            if inbox is not None and not inbox.closed:
                inbox.put(piece)

    def close(self) -> None:
        """The connection ended: every stream it carried broke off."""
        self.closed = True
        streams, self.streams = self.streams, {}
        for inbox in streams.values():
            inbox.put(Ending.BROKEN)


class NodeChannels:
    """The gateway's node channels, by channel id; a channel id stands for one kind of request server (see
    ``key``), which every node of an executor runs."""

    def __init__(self, tokens: StreamTokens) -> None:
        self._tokens = tokens
        self._nonce = secrets.token_urlsafe(6)
        self._ids: dict[tuple[str, ...], str] = {}
        self._capacity: dict[str, int] = {}
        self._connected: dict[str, list[NodeChannel]] = {}
        self._token: dict[str, tuple[float, str]] = {}

    def key(self, key: tuple[str, ...], capacity: int) -> str:
        """The channel id of the request servers that ``key`` describes, each holding ``capacity`` requests."""
        channel_id = self._ids.get(key)
        if channel_id is None:
            # The nonce keeps a restarted gateway's ids apart from the last one's.
            channel_id = self._ids[key] = f"{self._nonce}-{len(self._ids)}"
            self._capacity[channel_id] = capacity
        return channel_id

    def invitation(self, channel_id: str, relay_url: str) -> dict[str, str]:
        """What a hand-over carries so that the request server dials in: the channel's URL and token."""
        now = time.time()
        expires, token = self._token.get(channel_id, (0.0, ""))
        if expires - now < _TOKEN_TTL / 2:
            expires = now + _TOKEN_TTL
            token = self._tokens.issue(f"channel.{channel_id}", expires)
            self._token[channel_id] = (expires, token)
        scheme, rest = relay_url.split("://", 1)
        url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}{CHANNEL_PATH}/{channel_id}"
        return {"id": channel_id, "url": url, "token": token}

    def pick(self, channel_id: str) -> NodeChannel | None:
        """The connected channel with the most free room, if one has any."""
        best: NodeChannel | None = None
        for channel in self._connected.get(channel_id, ()):
            if channel.free > 0 and (best is None or channel.free > best.free):
                best = channel
        return best

    async def offer(self, channel_id: str, request: dict[str, Any], inbox: Inbox) -> bool:
        """Send ``request`` down a connected channel of ``channel_id`` with room, for its events to reach ``inbox``.

        False when none is connected or all are full (or the one picked closed as the request went): the request
        then goes by task, with an ``invitation`` for its request server to dial in.
        """
        channel = self.pick(channel_id)
        if channel is None:
            return False
        try:
            await channel.submit({**request, "stream": {"id": inbox.stream_id}}, inbox)
        except Exception as exc:
            # It closed as the request went: its streams are broken, this one goes by task.
            log.info("a node channel of %s closed: %s", channel_id, exc)
            return False
        return True

    def connected(self, channel_id: str) -> int:
        """How many request servers of ``channel_id`` are connected."""
        return len(self._connected.get(channel_id, ()))

    def admits(self, channel_id: str, token: str) -> bool:
        return channel_id in self._capacity and self._tokens.verify(f"channel.{channel_id}", token)

    def attach(self, channel_id: str, send: Callable[[bytes], Awaitable[None]]) -> NodeChannel:
        channel = NodeChannel(send, self._capacity[channel_id])
        self._connected.setdefault(channel_id, []).append(channel)
        return channel

    def detach(self, channel_id: str, channel: NodeChannel) -> None:
        connected = self._connected.get(channel_id, [])
        if channel in connected:
            connected.remove(channel)
        channel.close()
