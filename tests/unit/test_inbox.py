"""The inbox a streamed answer through a worker is read from: its order, and its limit on silence."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.streaming.relay import Ending, LocalRelay


async def test_items_come_in_the_order_they_were_put_whether_or_not_someone_waits() -> None:
    inbox = await LocalRelay(b"s" * 32).open(ttl=60)
    inbox.put(b"data: 1\n\n")
    assert await inbox.get(1.0) == b"data: 1\n\n"
    waiting = asyncio.ensure_future(inbox.get(1.0))
    await asyncio.sleep(0)
    inbox.put(b"data: 2\n\n")
    inbox.put(Ending.COMPLETE)
    assert await waiting == b"data: 2\n\n"
    assert await inbox.get() is Ending.COMPLETE
    inbox.close()


async def test_silence_longer_than_the_patience_is_a_timeout_and_each_item_starts_it_again() -> None:
    inbox = await LocalRelay(b"s" * 32).open(ttl=60)

    async def trickle() -> None:
        for _ in range(4):
            await asyncio.sleep(0.1)
            inbox.put(b"data: x\n\n")

    feeding = asyncio.ensure_future(trickle())
    # Four items 0.1 s apart: 0.4 s in all, more than the patience, but never 0.25 s of silence.
    for _ in range(4):
        assert await inbox.get(0.25) == b"data: x\n\n"
    await feeding
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await inbox.get(0.25)
    assert 0.2 < time.monotonic() - started < 1.0
    # A timeout leaves the inbox usable, and a cancelled wait leaves nothing behind.
    inbox.put(b"data: late\n\n")
    assert await inbox.get(0.25) == b"data: late\n\n"
    waiting = asyncio.ensure_future(inbox.get(0.05))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0.1)
    assert waiting.cancelled()
    inbox.close()


async def test_a_reader_behind_takes_the_chunks_queued_so_far_as_one_and_stops_at_anything_else() -> None:
    inbox = await LocalRelay(b"s" * 32).open(ttl=60)
    done = asyncio.get_running_loop().create_future()
    for item in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", done, b"data: 4\n\n", Ending.COMPLETE):
        inbox.put(item)
    first = await inbox.get(1.0)
    assert isinstance(first, bytes)
    assert inbox.joined(first) == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    # The task's result and the ending keep their places: only chunks are joined.
    assert await inbox.get(1.0) is done
    fourth = await inbox.get(1.0)
    assert isinstance(fourth, bytes)
    assert inbox.joined(fourth) == b"data: 4\n\n"
    assert await inbox.get(1.0) is Ending.COMPLETE
    inbox.close()
