"""The usage writer: a process of its own that stores usage rows, writes the access log and counts for metrics.

Inserting rows into a database, formatting log lines and counting requests by their labels are the most expensive
things the gateway does for a request after serving it; in the serving process they take the event loop's CPU
(and, through a thread, its GIL). Here the serving process only turns each finished request's record into a tuple
of plain values (``row_of``, in C) and, after each pass of the request ledger, sends the pass's tuples down a pipe
in one frame. The writer process runs the ``UsageRecorder`` (batched inserts, the spool while the database is
down, replay when it returns), the ``AccessLog`` and a ``Tally`` of the counts ``/metrics`` shows, and reports its
counters and the new counts back twice a second, and at once when the gateway asks (a scrape of ``/metrics``).

Frames on the writer's stdin are a 4-byte big-endian length and a JSON list of rows (``FinishedRequest``'s values),
or a JSON number asking for a report that says it was sent after every row before it; orjson writes them two and a
half times as fast as ``marshal``. Its stdout carries one JSON object of counters per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import uvloop

from gateway.accounting.record import FinishedRequest
from gateway.accounting.recorder import UsageRecorder
from gateway.config import GatewayConfig, LoggingSettings
from gateway.observability.logs import AccessLog, configure_logging
from gateway.observability.recent import RecentActivity
from gateway.observability.tally import Tally
from gateway.storage.database import Database

log = logging.getLogger("gateway.accounting")

_STATUS_SECONDS = 0.5
_SYNC_SECONDS = 2.0
_SETTINGS_ENV = "INFERENCE_GATEWAY_WRITER_SETTINGS"
_MAX_FRAME = 1 << 30


class UsageWriter:
    """The gateway's handle on the writer process: ``send`` after each ledger pass, ``sync`` before a scrape.

    It shows the counters the metrics read (``depth``, ``dropped``, ``written``, ``spooled``,
    ``database_up``) as the writer last reported them, ``tally``, the counts of every request the writer
    was handed, and ``recent``, the last hour of those counts a minute at a time (records in a frame the writer
    never read, because it died or fell too far behind, are in none of these). Frames that would pile up past
    ``queue_size`` rows in the pipe (the writer stopped reading) are dropped and counted. A writer that dies is
    started again.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.queue_size = int(settings["queue_size"])
        self.depth = 0
        self.dropped = 0
        self.written = 0
        self.spooled = 0
        self.database_up = False
        self.tally = Tally()
        self.recent = RecentActivity()
        self._in_pipe = 0
        self._syncs = 0
        self._synced = 0
        self._lost = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reported = asyncio.Event()
        self._closing = False

    @classmethod
    def for_config(cls, config: GatewayConfig, state_dir: Path) -> UsageWriter | None:
        """The writer ``config`` asks for: None when the usage log, the access log and the metrics are all off."""
        database = config.database
        if not (database.usage_log or config.logging.access_log or config.metrics.enabled):
            return None
        return cls(
            {
                "url": database.resolved_url(state_dir),
                "timeout": database.timeout,
                "spool": str(state_dir / "usage-spool.jsonl"),
                "usage_log": database.usage_log,
                "queue_size": database.queue_size,
                "batch_size": database.batch_size,
                "flush_interval": database.flush_interval,
                "retry_interval": database.retry_interval,
                "access_log": config.logging.access_log,
                "metrics": config.metrics.enabled,
                "logging": config.logging.model_dump(by_alias=True),
                "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
                "start_timeout": database.timeout + 5.0,
                "stop_timeout": database.timeout + 20.0,
            }
        )

    def send(self, rows: list[tuple[Any, ...]]) -> None:
        """Send finished requests' rows (``row_of``), in one frame."""
        process = self._process
        if process is None or process.stdin is None:
            self._drop(len(rows), "the usage writer is not running")
            return
        if self._in_pipe + len(rows) > self.queue_size and process.stdin.transport.get_write_buffer_size() > 0:
            self._drop(len(rows), "the usage writer is not keeping up")
            return
        self._write(rows)
        self._in_pipe += len(rows)

    def _write(self, message: Any) -> None:
        assert self._process is not None and self._process.stdin is not None
        frame = orjson.dumps(message)
        self._process.stdin.write(len(frame).to_bytes(4, "big") + frame)

    async def sync(self) -> None:
        """Wait (at most two seconds) for a report from the writer that covers every record sent so far."""
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            return
        self._syncs += 1
        number = self._syncs
        self._write(number)
        try:
            async with asyncio.timeout(_SYNC_SECONDS):
                while self._synced < number:
                    self._reported.clear()
                    await self._reported.wait()
        except TimeoutError:
            log.warning("the usage writer did not report within %.0f s; metrics may lag", _SYNC_SECONDS)

    def _drop(self, count: int, why: str) -> None:
        self._lost += count
        self.dropped += count
        if self._lost == count or self._lost % 10_000 < count:
            log.error("%s: %d usage rows and access lines lost so far", why, self._lost)

    async def start(self) -> None:
        # In the environment, not on the command line: the database URL may hold a password, and any user of the
        # machine can read a process's command line.
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.observability.writer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, _SETTINGS_ENV: orjson.dumps(self.settings).decode()},
        )
        self._reported.clear()
        self._reader = asyncio.create_task(self._read_reports(self._process), name="usage-writer-reports")
        # The first report comes once the database was migrated, or found down and the spool chosen.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reported.wait(), float(self.settings["start_timeout"]))

    async def _read_reports(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            try:
                report = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            self.depth = int(report["depth"])
            self.written = int(report["written"])
            self.spooled = int(report["spooled"])
            self.database_up = bool(report["database_up"])
            self.dropped = int(report["dropped"]) + self._lost
            self._in_pipe = max(0, self._in_pipe - int(report["received"]))
            if report.get("tally"):
                self.tally.merge(report["tally"])
                self.recent.add(report["tally"])
            self._synced = int(report["synced"])
            self._reported.set()
        status = await process.wait()
        if not self._closing:
            log.error("the usage writer exited with status %s; starting it again", status)
            self._in_pipe = 0
            await asyncio.sleep(1.0)
            if not self._closing:
                await self.start()

    async def close(self) -> None:
        self._closing = True
        process = self._process
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), float(self.settings["stop_timeout"]))
        except TimeoutError:
            log.error("the usage writer did not finish in time; its unsaved rows are in its spool or lost")
            process.kill()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class _Writer:
    """The writer process's side: frames in, rows to the recorder, lines to the access log, counters out."""

    def __init__(self, settings: dict[str, Any]) -> None:
        database = Database(settings["url"], timeout=float(settings["timeout"]))
        self.database = database
        self.recorder = (
            UsageRecorder(
                database,
                Path(settings["spool"]),
                queue_size=int(settings["queue_size"]),
                batch_size=int(settings["batch_size"]),
                flush_interval=float(settings["flush_interval"]),
                retry_interval=float(settings["retry_interval"]),
            )
            if settings["usage_log"]
            else None
        )
        logging_settings = LoggingSettings(**settings["logging"])
        self.access_log = AccessLog(logging_settings) if settings["access_log"] else None
        self.tally = Tally() if settings["metrics"] else None
        self.received = 0
        self.synced = 0

    def report(self) -> None:
        recorder = self.recorder
        counters: dict[str, Any] = {
            "depth": recorder.depth if recorder else 0,
            "dropped": recorder.dropped if recorder else 0,
            "written": recorder.written if recorder else 0,
            "spooled": recorder.spooled if recorder else 0,
            "database_up": recorder.database_up if recorder else False,
            "received": self.received,
            "synced": self.synced,
        }
        if self.tally:
            counters["tally"] = self.tally.export()
            self.tally = Tally()
        self.received = 0
        os.write(1, orjson.dumps(counters, option=orjson.OPT_APPEND_NEWLINE))

    async def _report_regularly(self) -> None:
        while True:
            await asyncio.sleep(_STATUS_SECONDS)
            self.report()

    def take(self, rows: list[list[Any]]) -> None:
        recorder, access_log, tally = self.recorder, self.access_log, self.tally
        for values in rows:
            record = FinishedRequest._make(values)
            if recorder is not None and record.model is not None:
                recorder.add(record)
            if access_log is not None:
                access_log.write(record)
            if tally is not None:
                tally.observe(record)
        if access_log is not None:
            access_log.flush()
        self.received += len(rows)

    async def run(self) -> None:
        if self.recorder is not None:
            await self.recorder.start()
        # As in the gateway: what startup built (SQLAlchemy, the migrations) stays out of every full collection.
        gc.collect()
        gc.freeze()
        self.report()
        reporter = asyncio.create_task(self._report_regularly())
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_FRAME)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
        try:
            while True:
                try:
                    size = int.from_bytes(await reader.readexactly(4), "big")
                    message = orjson.loads(await reader.readexactly(size))
                except asyncio.IncompleteReadError:
                    break  # the gateway closed the pipe: it is stopping
                if isinstance(message, int):
                    # Every row sent before this request has been taken: report them now.
                    self.synced = message
                    self.report()
                else:
                    self.take(message)
        finally:
            reporter.cancel()
            if self.recorder is not None:
                await self.recorder.close()
            await self.database.close()
            self.report()


def main() -> None:
    settings = orjson.loads(os.environ.pop(_SETTINGS_ENV))
    configure_logging(LoggingSettings(**settings["logging"]), settings["log_level"])
    # Ctrl-C and a stop signal to the process group reach the writer too; it stops when the gateway closes the
    # pipe (at its own shutdown, or by dying), after storing or spooling what it holds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    uvloop.run(_Writer(settings).run())


if __name__ == "__main__":
    main()
