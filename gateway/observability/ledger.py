"""Finished requests, handed to the usage writer in batches a few times a second.

The observing middleware appends each finished request's row (``row_of`` its record) to ``finished``; every
``interval`` seconds the ledger sends what gathered to the usage writer process in one frame, which counts it for
the metrics, writes its access line and stores its usage row there. Doing that work for a few hundred requests in
one pass, in another process, leaves the serving process only the row and the append (measured with
``scripts/bench-observability.py``). What must be exact at once (the rate limiter's settlement, the in-flight
gauges) is not deferred: the middleware does it before handing the row over.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from gateway.accounting.writer import UsageWriter


class RequestLedger:
    """Takes finished requests on the request path and passes them on every ``interval`` seconds; it starts and
    stops its usage writer with it."""

    def __init__(self, writer: UsageWriter, interval: float = 0.1) -> None:
        self.writer = writer
        self.interval = interval
        self.finished: list[tuple[Any, ...]] = []
        self._task: asyncio.Task[None] | None = None

    def drain(self) -> None:
        """Send everything finished so far to the usage writer to be counted, logged and recorded."""
        finished, self.finished = self.finished, []
        if finished:
            self.writer.send(finished)

    async def sync(self) -> None:
        """Hand over everything finished so far and wait until the writer has counted it (a scrape's counts)."""
        self.drain()
        await self.writer.sync()

    async def start(self) -> None:
        await self.writer.start()
        self._task = asyncio.create_task(self._drain_regularly(), name="request-ledger")

    async def _drain_regularly(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.drain()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.drain()
        await self.writer.close()
