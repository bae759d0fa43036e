"""The gateway's side of node channels: who may dial in, which channel a request takes, where its pieces go."""

from __future__ import annotations

import asyncio

import orjson

from gateway.streaming.channels import NodeChannels
from gateway.streaming.relay import Ending, LocalRelay


class Sent:
    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []

    async def __call__(self, data: bytes) -> None:
        self.messages.append(orjson.loads(data))


def test_only_a_token_for_that_channel_dials_in() -> None:
    relay = LocalRelay(b"s" * 32)
    channels = NodeChannels(relay.tokens)
    first, second = channels.key(("pool", "4", "/state"), 4), channels.key(("pool", "8", "/state"), 8)
    invitation = channels.invitation(first, "https://gateway.example.org")
    assert invitation["url"] == f"wss://gateway.example.org/resource_server/internal/nodes/{first}"
    assert channels.admits(first, invitation["token"])
    assert not channels.admits(second, invitation["token"])
    assert not channels.admits("unknown", invitation["token"])
    assert not channels.admits(first, "1.forged")
    other = NodeChannels(LocalRelay(b"o" * 32).tokens)
    assert not channels.admits(first, other.invitation(other.key(("pool", "4", "/state"), 4), "http://x")["token"])


async def test_pieces_reach_their_inbox_and_the_outcome_frees_the_room() -> None:
    relay = LocalRelay(b"s" * 32)
    channels = NodeChannels(relay.tokens)
    channel_id = channels.key(("pool",), 1)
    assert channels.pick(channel_id) is None
    sent = Sent()
    channel = channels.attach(channel_id, sent)
    assert channels.pick(channel_id) is channel
    inbox = await relay.open(ttl=60)
    await channel.submit({"op": "chat/completions", "stream": {"id": inbox.stream_id}}, inbox)
    assert sent.messages == [{"op": "chat/completions", "stream": {"id": inbox.stream_id}}]
    assert channels.pick(channel_id) is None  # full
    key = inbox.stream_id
    channel.received(orjson.dumps([[key, "data: 1\n\n"], ["another-stream", "data: 2\n\n"]]))
    channel.received(orjson.dumps([[key, "event: outcome\ndata: {}\n\n"]]))
    assert [await inbox.get(), await inbox.get()] == [b"data: 1\n\n", b"event: outcome\ndata: {}\n\n"]
    assert channels.pick(channel_id) is channel
    inbox.close()
    await asyncio.sleep(0)
    assert len(sent.messages) == 1  # nothing to cancel once the outcome came


async def test_a_client_that_leaves_cancels_and_a_closed_channel_breaks_its_streams() -> None:
    relay = LocalRelay(b"s" * 32)
    channels = NodeChannels(relay.tokens)
    channel_id = channels.key(("pool",), 4)
    sent = Sent()
    channel = channels.attach(channel_id, sent)
    leaving, staying = await relay.open(ttl=60), await relay.open(ttl=60)
    await channel.submit({"stream": {"id": leaving.stream_id}}, leaving)
    await channel.submit({"stream": {"id": staying.stream_id}}, staying)
    leaving.close()
    await asyncio.sleep(0)
    assert sent.messages[-1] == {"cancel": leaving.stream_id}
    channels.detach(channel_id, channel)
    assert await staying.get() is Ending.BROKEN
    assert channels.pick(channel_id) is None
