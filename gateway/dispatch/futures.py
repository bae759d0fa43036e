"""Waiting from the event loop for a task that runs on a worker, without ever cancelling it."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Future
from typing import Any


async def result_of(future: Future[Any]) -> Any:
    """The result of ``future``, awaited without blocking the loop; giving up the wait leaves ``future`` alone.

    ``asyncio.wrap_future`` cancels the concurrent future when its waiter is cancelled (a client that hangs up, a
    timeout). Executors do not expect that: Parsl's result thread stops on the ``InvalidStateError`` of completing
    a cancelled future, and the Globus Compute SDK cannot match the late result to its task.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()

    def settle(done: Future[Any]) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.set_exception(RuntimeError("the executor cancelled the task"))
        elif (error := done.exception()) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(done.result())

    def settle_soon(done: Future[Any]) -> None:
        # A closed loop raises RuntimeError here: nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, done)

    future.add_done_callback(settle_soon)
    return await waiter
