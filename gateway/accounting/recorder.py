"""The usage log's writer: one row per request, written in batches by a background task."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path

from gateway.accounting.record import FinishedRequest
from gateway.accounting.spool import Row, Spool
from gateway.storage.database import Database, DatabaseUnavailable

log = logging.getLogger("gateway.accounting")


class UsageRecorder:
    """Takes finished requests on the request path and gets them into the database off it.

    ``add`` only appends to a bounded in-memory queue. A writer task inserts the queue every
    ``flush_interval`` seconds, or as soon as ``batch_size`` rows wait. While the database is down
    the rows go to a spool file and the database is tried again every ``retry_interval`` seconds;
    once it answers, the spool is replayed before anything newer. Rows are lost only when the
    queue is full (``dropped`` counts them), which means the writer cannot keep up even with
    the spool.
    """

    def __init__(
        self,
        database: Database,
        spool_path: Path,
        *,
        queue_size: int,
        batch_size: int,
        flush_interval: float,
        retry_interval: float,
    ) -> None:
        self.database = database
        self.spool = Spool(spool_path)
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.dropped = 0
        self.written = 0
        self.spooled = 0
        self.database_up = False
        self._pending: list[Row] = []
        # Ids that grow within a process keep inserts at the end of the primary key's index; the start time and
        # random part keep them apart from every other process's.
        self._id_prefix = f"{int(time.time()):08x}{os.urandom(6).hex()}"
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._retry_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def depth(self) -> int:
        return len(self._pending)

    def add(self, record: FinishedRequest) -> None:
        pending = self._pending
        if len(pending) >= self.queue_size:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage queue full (%d rows): %d usage rows dropped so far", self.queue_size, self.dropped)
            return
        # A tuple of plain values, not the record: the collector stops tracking it, and the record goes now.
        pending.append(self._row(record))
        if len(pending) == self.batch_size:
            self._wake.set()

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def close(self) -> None:
        if self._task is not None:
            # Not cancelled: a batch taken off the queue must end up in the database or the spool.
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
        # One last try at the database; whatever it does not take is kept in the spool for the next start.
        self._retry_at = 0.0
        await self._flush()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self._flush()
            except Exception:
                log.exception("usage writer failed; it goes on with the next batch")

    async def _connect(self) -> bool:
        """Migrate and replay the spool; False (and a time for the next try) when the database is down."""
        try:
            await self.database.migrate()
            if self.spool.exists():
                await self._replay()
        except DatabaseUnavailable as exc:
            if self.database_up or self._retry_at == 0.0:
                log.warning("usage database unavailable, rows go to %s until it is back: %s", self.spool.path, exc)
            self.database_up = False
            self._retry_at = time.monotonic() + self.retry_interval
            return False
        if not self.database_up:
            log.info("usage database is up (%s)", self.database.dialect)
        self.database_up = True
        return True

    async def _replay(self) -> None:
        # Held from the read to the rewrite: rows another replica appends meanwhile wait, and are not overwritten.
        lock = await asyncio.to_thread(self.spool.hold)
        try:
            rows = await asyncio.to_thread(self.spool.read)
            log.info("replaying %d spooled usage rows", len(rows))
            done = 0
            try:
                for start in range(0, len(rows), self.batch_size):
                    batch = rows[start : start + self.batch_size]
                    await self.database.insert_usage(batch)
                    done += len(batch)
            finally:
                await asyncio.to_thread(self.spool.replace, rows[done:])
                self.written += done
        finally:
            await asyncio.to_thread(self.spool.release, lock)

    async def _flush(self) -> None:
        rows, self._pending = self._pending, []
        if not self.database_up and (time.monotonic() < self._retry_at or not await self._connect()):
            await self._keep(rows)
            return
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            try:
                await self.database.insert_usage(batch)
            except Exception as exc:
                # Whatever went wrong, the rows taken off the queue exist nowhere else: they go to the spool.
                if isinstance(exc, DatabaseUnavailable):
                    log.warning("usage database unavailable, rows go to %s until it is back: %s", self.spool.path, exc)
                else:
                    log.exception("usage rows could not be inserted; they go to %s", self.spool.path)
                self.database_up = False
                self._retry_at = time.monotonic() + self.retry_interval
                await self._keep(rows[start:])
                return
            self.written += len(batch)

    def _row(self, record: FinishedRequest) -> Row:
        return (
            f"{self._id_prefix}{next(self._ids):012x}",
            record.request_id,
            record.started_at,
            record.user,
            record.cluster,
            record.framework,
            record.model,
            record.op,
            record.transport,
            record.stream,
            record.status,
            record.error_code,
            record.prompt_tokens,
            record.completion_tokens,
            record.ttft,
            record.duration,
        )

    async def _keep(self, rows: list[Row]) -> None:
        if not rows:
            return
        try:
            await asyncio.to_thread(self.spool.append, rows)
        except OSError as exc:
            self.dropped += len(rows)
            log.error("could not spool %d usage rows to %s, they are lost: %s", len(rows), self.spool.path, exc)
            return
        self.spooled += len(rows)
