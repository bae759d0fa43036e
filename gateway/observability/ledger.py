"""Finished requests, handed to the usage writer in batches within ten milliseconds of finishing.

The observing middleware adds each finished request's row (``row_of`` its record); ``interval`` seconds after the
first of them the ledger sends what gathered to the usage writer process in one frame, which counts it for
the metrics, writes its access line and stores its usage row there. Doing that work for a few hundred requests in
one pass, in another process, leaves the serving process only the row and the append (measured with
``scripts/bench-observability.py``). What must be exact at once (the rate limiter's settlement, the in-flight
gauges) is not deferred: it is done before the row is handed over.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.observability.writer import UsageWriter


class RequestLedger:
    """Takes finished requests on the request path and passes them on ``interval`` seconds after the first of them;
    it starts and stops its usage writer with it.

    The interval is the window a ``kill -9`` of the gateway can lose: rows not yet handed over die with the
    process, rows the writer holds are stored or spooled by it. Ten milliseconds keeps that window small and
    still gathers hundreds of requests a frame under load; an idle gateway sends nothing and never wakes up.
    """

    def __init__(self, writer: UsageWriter, interval: float = 0.01) -> None:
        self.writer = writer
        self.interval = interval
        self.finished: list[tuple[Any, ...]] = []
        self._due: asyncio.TimerHandle | None = None
        self._open = False

    def add(self, row: tuple[Any, ...]) -> None:
        """Take a finished request's row; it goes to the writer within ``interval`` seconds."""
        self.finished.append(row)
        if self._due is None and self._open:
            self._due = asyncio.get_running_loop().call_later(self.interval, self.drain)

    def drain(self) -> None:
        """Send everything finished so far to the usage writer to be counted, logged and recorded."""
        if self._due is not None:
            self._due.cancel()
            self._due = None
        finished, self.finished = self.finished, []
        if finished:
            self.writer.send(finished)

    async def sync(self) -> None:
        """Hand over everything finished so far and wait until the writer has counted it (a scrape's counts)."""
        self.drain()
        await self.writer.sync()

    async def start(self) -> None:
        await self.writer.start()
        self._open = True

    async def close(self) -> None:
        self._open = False
        self.drain()
        await self.writer.close()
