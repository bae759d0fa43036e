"""The gateway's database: schema migrations at startup, usage rows in, usage reports out."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.storage.tables import usage_log

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# What a usage report can be grouped by.
REPORT_DIMENSIONS = ("user", "model", "day", "cluster", "endpoint")
_COLUMNS = {"user": "username", "model": "model", "cluster": "cluster", "endpoint": "endpoint"}


# The order of a usage row's values, as ``insert_usage`` takes them.
USAGE_COLUMNS = tuple(str(column.name) for column in usage_log.columns)
_EPOCH = datetime(1970, 1, 1)
# Rows per INSERT at most: many, so that the GIL changes hands a few times a batch rather than once a row. A power
# of two; SQLite takes at most 999 parameters in a statement before 3.32.
_SQLITE_ROWS_PER_STATEMENT = 128 if sqlite3.sqlite_version_info >= (3, 32) else 32


def _unix(when: datetime) -> float:
    """A naive UTC time (or an aware one) as UNIX seconds."""
    if when.tzinfo is not None:
        return when.timestamp()
    return (when - _EPOCH).total_seconds()


def _dimension(name: str, dialect: str) -> sa.ColumnElement[Any]:
    if name != "day":
        return usage_log.c[_COLUMNS[name]]
    # The UTC day of ``created_at`` (UNIX seconds), as YYYY-MM-DD.
    if dialect == "sqlite":
        return sa.func.date(usage_log.c.created_at, "unixepoch")
    return sa.func.to_char(sa.func.to_timestamp(usage_log.c.created_at).op("AT TIME ZONE")("UTC"), "YYYY-MM-DD")


class DatabaseUnavailable(Exception):
    """The database could not be reached or refused the statement."""


def _upgrade(connection: sa.Connection) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _locked(path: Path) -> IO[str]:
    handle = open(path, "a")  # noqa: SIM115 - closing it is what releases the lock
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


class Database:
    """One async engine for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    Every call is bounded by ``timeout`` seconds and raises ``DatabaseUnavailable`` when the
    database is down, so callers can keep their rows elsewhere and try again later.
    """

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = make_url(url)
        self.timeout = timeout
        self.dialect = self.url.get_backend_name()
        options: dict[str, Any] = {"pool_pre_ping": True}
        if self.dialect == "sqlite":
            options["connect_args"] = {"timeout": min(timeout, 2.0)}
            insert: sa.Insert = sqlite.insert(usage_log).on_conflict_do_nothing(index_elements=["id"])
        else:
            options["connect_args"] = {"timeout": timeout, "command_timeout": timeout}
            options["pool_size"] = 2
            insert = postgresql.insert(usage_log).on_conflict_do_nothing(index_elements=["id"])
        self.engine: AsyncEngine = create_async_engine(self.url, **options)
        # Usage rows go straight to the driver, in its own parameter style: SQLAlchemy's per-row processing
        # costs more than everything else the gateway does for a request.
        compiled = insert.compile(dialect=self.engine.dialect)
        assert tuple(compiled.positiontup or ()) == USAGE_COLUMNS, compiled.positiontup
        self._insert_sql = compiled.string
        self._multi_row_sql: dict[int, str] = {}
        self._sqlite: sqlite3.Connection | None = None
        self._sqlite_lock = threading.Lock()
        self._migration: asyncio.Task[None] | None = None
        self._migrated = False
        if self.dialect == "sqlite":
            sa.event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    @property
    def sqlite_path(self) -> Path | None:
        if self.dialect != "sqlite" or not self.url.database or self.url.database == ":memory:":
            return None
        return Path(self.url.database)

    async def _bounded(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, self.timeout)
        except TimeoutError as exc:
            # A database that accepts connections and never answers: a TimeoutError has no message of its own.
            raise DatabaseUnavailable(f"no answer in {self.timeout:g} s") from exc
        except (OSError, sa.exc.SQLAlchemyError, sqlite3.Error) as exc:
            first_line = next(iter(str(exc).splitlines()), "")[:300]
            raise DatabaseUnavailable(f"{exc.__class__.__name__}: {first_line or 'no detail'}") from exc

    async def migrate(self) -> None:
        """Bring the schema to the newest revision, once; safe to run from several replicas at once.

        The usage writer, the batch service and the batch runner each need the tables and ask for them at once:
        they share one migration, and once it has succeeded asking again costs nothing. The migration goes on
        when a caller's wait (``timeout``) runs out: an upgrade of several revisions takes many round trips, and
        on a slow database, cut off at each caller's bound, it would never finish (asyncpg's ``command_timeout``
        still bounds each statement of it).
        """
        if self._migrated:
            return
        running = self._migration
        if running is None or (running.done() and (running.cancelled() or running.exception() is not None)):
            running = self._migration = asyncio.create_task(self._migrate())
            # A migration that fails after every caller stopped waiting is retried by the next caller.
            running.add_done_callback(lambda task: task.cancelled() or task.exception())
        await self._bounded(asyncio.shield(running))
        self._migrated = True

    async def _migrate(self) -> None:
        path = self.sqlite_path
        if path is None:
            await self._upgrade()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replicas sharing one SQLite file take turns; PostgreSQL has its own lock in env.py.
        lock = await asyncio.to_thread(_locked, path.with_name(path.name + ".migrate-lock"))
        try:
            await self._upgrade()
        finally:
            lock.close()

    async def _upgrade(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(_upgrade)

    async def ping(self) -> None:
        async def probe() -> None:
            async with self.engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))

        await self._bounded(probe())

    async def insert_usage(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert usage rows (values in ``USAGE_COLUMNS`` order) in one transaction; a row whose id is already
        stored is skipped."""
        if self.dialect != "sqlite":

            async def insert() -> None:
                async with self.engine.begin() as connection:
                    await connection.exec_driver_sql(self._insert_sql, list(rows))

            await self._bounded(insert())
            return
        width = len(USAGE_COLUMNS)
        flat: list[Any] = []
        for row in rows:
            flat.extend(row)
        statements = []
        start, left = 0, len(rows)
        while left:
            # Statements of a power of two rows: a handful of statements serve every batch size, and sqlite3 keeps
            # them all prepared; a statement for each new remainder would be parsed again every time.
            count = min(_SQLITE_ROWS_PER_STATEMENT, 1 << (left.bit_length() - 1))
            statements.append((self._rows_sql(count), tuple(flat[start * width : (start + count) * width])))
            start, left = start + count, left - count
        await self._bounded(asyncio.to_thread(self._sqlite_write, statements))

    def _sqlite_write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``statements`` in one transaction, in a worker thread, on a connection kept for usage rows.

        Every hand-over between this thread and the event loop's costs both of them a wait for the GIL, and
        the async driver makes several per transaction (and sqlite3's executemany one per row); so the whole
        transaction is one call here, and the rows go many to a statement.
        """
        with self._sqlite_lock:
            if self._sqlite is None:
                path = self.sqlite_path
                assert path is not None
                self._sqlite = sqlite3.connect(path, timeout=min(self.timeout, 2.0), check_same_thread=False)
                _sqlite_pragmas(self._sqlite, None)
            with self._sqlite:
                for sql, parameters in statements:
                    self._sqlite.execute(sql, parameters)

    def _rows_sql(self, count: int) -> str:
        sql = self._multi_row_sql.get(count)
        if sql is None:
            one = "(" + ", ".join(["?"] * len(USAGE_COLUMNS)) + ")"
            head, _, tail = self._insert_sql.partition(one)
            assert tail, self._insert_sql
            sql = self._multi_row_sql[count] = head + ", ".join([one] * count) + tail
        return sql

    async def usage_report(
        self,
        by: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
    ) -> list[dict[str, Any]]:
        """Requests, errors and tokens grouped by ``by`` (names from ``REPORT_DIMENSIONS``), oldest day first;
        only ``user``'s when given."""
        keys = [_dimension(name, self.dialect).label(name) for name in by]
        query = sa.select(
            *keys,
            sa.func.count().label("requests"),
            sa.func.count(usage_log.c.error_code).label("errors"),
            sa.func.coalesce(sa.func.sum(usage_log.c.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(usage_log.c.completion_tokens), 0).label("completion_tokens"),
        )
        if since is not None:
            query = query.where(usage_log.c.created_at >= _unix(since))
        if until is not None:
            query = query.where(usage_log.c.created_at < _unix(until))
        if user is not None:
            query = query.where(usage_log.c.username == user)
        if keys:
            query = query.group_by(*keys).order_by(*keys)

        async def run() -> list[dict[str, Any]]:
            async with self.engine.connect() as connection:
                result = await connection.execute(query)
                return [dict(row._mapping) for row in result]

        rows: list[dict[str, Any]] = await self._bounded(run())
        for row in rows:
            if "day" in row and row["day"] is not None:
                row["day"] = str(row["day"])
            row["total_tokens"] = int(row["prompt_tokens"]) + int(row["completion_tokens"])
        return rows

    async def close(self) -> None:
        if self._migration is not None and not self._migration.done():
            self._migration.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._migration
        await self.engine.dispose()
        with self._sqlite_lock:
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite = None


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets the usage report read while the gateway writes; NORMAL sync is still safe against crashes in WAL.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
