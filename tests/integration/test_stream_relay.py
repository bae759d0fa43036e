"""The stream relay behind its real route, in one process and across two replicas through Redis.

The worker's side is a plain HTTP client posting a chunked body, as ``compute_functions.inference`` does.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from gateway.app import ROUTES
from gateway.streaming.redis import RedisRelay
from gateway.streaming.relay import Ending, Inbox, LocalRelay, Relay, stream_url

REDIS_URL = os.environ.get("INFERENCE_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def redis_reachable() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Door:
    """A relay's waiting side, and the URL of a gateway route (maybe another replica's) that workers post to."""

    def __init__(self, waiting: Relay, url: str) -> None:
        self.waiting = waiting
        self.url = url

    async def open(self, ttl: float = 30.0) -> Inbox:
        return await self.waiting.open(ttl)

    async def post(self, inbox: Inbox, body: object, token: str | None = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {inbox.token if token is None else token}"}
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.post(stream_url(self.url, inbox.stream_id), content=body, headers=headers)  # type: ignore[arg-type]


async def serve(relay: Relay) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    app = Starlette(routes=ROUTES)
    app.state.runtime = SimpleNamespace(relay=relay)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", loop="asyncio")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(params=["local", "redis"])
async def door(request: pytest.FixtureRequest) -> AsyncIterator[Door]:
    if request.param == "local":
        waiting = receiving = LocalRelay(secrets.token_bytes(32))
    else:
        if not redis_reachable():
            pytest.fail(f"no Redis at {REDIS_URL}: the relay tests need the machine's Redis (see docs/testing.md)")
        prefix = f"test-relay-{secrets.token_hex(4)}:"
        # Two replicas sharing the secret they find in Redis: the worker reaches the one that does not wait.
        waiting, receiving = RedisRelay(REDIS_URL, prefix, None), RedisRelay(REDIS_URL, prefix, None)
        await waiting.start()
        await receiving.start()
    server, task, url = await serve(receiving)
    try:
        yield Door(waiting, url)
    finally:
        server.should_exit = True
        await task
        for relay in {id(waiting): waiting, id(receiving): receiving}.values():
            await relay.close()


async def nothing_arrives(inbox: Inbox) -> bool:
    try:
        await asyncio.wait_for(inbox.get(), 0.3)
    except TimeoutError:
        return True
    return False


async def test_each_chunk_arrives_while_the_worker_is_still_writing(door: Door) -> None:
    inbox = await door.open()
    delays: list[float] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(5):
            sent = time.perf_counter()
            yield f'data: {{"n": {i}}}\n\n'.encode()
            assert await asyncio.wait_for(inbox.get(), 2) == f'data: {{"n": {i}}}\n\n'.encode()
            delays.append(time.perf_counter() - sent)

    response = await door.post(inbox, body())
    assert response.status_code == 204
    assert await asyncio.wait_for(inbox.get(), 2) is Ending.COMPLETE
    # No batching and no polling on the way: each chunk is through in well under a poll period.
    assert max(delays) < 0.2, delays


async def test_forged_token_is_401_and_writes_nothing(door: Door) -> None:
    inbox = await door.open()
    expires, _, signature = inbox.token.partition(".")
    forged = f"{expires}.{signature[::-1]}"
    response = await door.post(inbox, b"data: forged\n\n", token=forged)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_stream_token"
    assert await nothing_arrives(inbox)
    assert (await door.post(inbox, b"data: x\n\n", token="not-a-token")).status_code == 401


async def test_expired_token_is_401(door: Door) -> None:
    inbox = await door.open(ttl=0.01)
    await asyncio.sleep(1.1)
    response = await door.post(inbox, b"data: late\n\n")
    assert response.status_code == 401
    assert await nothing_arrives(inbox)


async def test_replayed_token_is_409(door: Door) -> None:
    inbox = await door.open()
    assert (await door.post(inbox, b"data: one\n\n")).status_code == 204
    replay = await door.post(inbox, b"data: two\n\n")
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "stream_already_received"
    assert await inbox.get() == b"data: one\n\n" and await inbox.get() is Ending.COMPLETE
    assert await nothing_arrives(inbox)


async def test_a_second_writer_during_the_stream_is_409(door: Door) -> None:
    inbox = await door.open()
    release = asyncio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        await release.wait()

    first = asyncio.create_task(door.post(inbox, held()))
    assert await asyncio.wait_for(inbox.get(), 2) == b"data: first\n\n"
    assert (await door.post(inbox, b"data: intruder\n\n")).status_code == 409
    release.set()
    assert (await first).status_code == 204


async def test_unknown_stream_is_404(door: Door) -> None:
    inbox = await door.open()
    unknown = Inbox("no-such-stream", inbox.token, inbox.expires, lambda _: None)
    response = await door.post(unknown, b"data: x\n\n")
    assert response.status_code == 404 and response.json()["error"]["code"] == "stream_not_found"


async def test_a_stream_nobody_waits_for_is_410(door: Door) -> None:
    inbox = await door.open()
    inbox.close()
    await asyncio.sleep(0.1)
    response = await door.post(inbox, b"data: x\n\n")
    assert response.status_code == 410 and response.json()["error"]["code"] == "stream_abandoned"


async def test_the_worker_is_cut_off_when_the_client_goes_away(door: Door) -> None:
    inbox = await door.open()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"data: token\n\n"
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(door.post(inbox, endless()))
    assert await asyncio.wait_for(inbox.get(), 2) == b"data: token\n\n"
    inbox.close()
    started = time.monotonic()
    try:
        response = await asyncio.wait_for(writer, 5)
    except httpx.TransportError:
        pass
    else:
        assert response.status_code == 410
    assert time.monotonic() - started < 3


async def test_a_worker_that_dies_mid_stream_breaks_the_stream(door: Door) -> None:
    inbox = await door.open()
    host, port = door.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = stream_url("", inbox.stream_id)
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {inbox.token}\r\n"
    chunk = b"data: partial\n\n"
    writer.write(f"{head}transfer-encoding: chunked\r\n\r\n{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    await writer.drain()
    assert await asyncio.wait_for(inbox.get(), 2) == chunk
    writer.close()
    assert await asyncio.wait_for(inbox.get(), 2) is Ending.BROKEN
    reader.feed_eof()
