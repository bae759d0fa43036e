"""The gateway's database: schema migrations at startup, usage rows in, usage reports out."""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
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

# What a usage report can be grouped by, and the column (or expression) behind each name.
REPORT_DIMENSIONS: dict[str, sa.ColumnElement[Any]] = {
    "user": usage_log.c.username,
    "model": usage_log.c.model,
    "day": sa.func.date(usage_log.c.created_at),
    "cluster": usage_log.c.cluster,
    "endpoint": usage_log.c.endpoint,
}


# The order of a usage row's values, as ``insert_usage`` takes them.
USAGE_COLUMNS = tuple(str(column.name) for column in usage_log.columns)
_EPOCH = datetime(1970, 1, 1)
# SQLite takes at most 32766 parameters in one statement (999 before 3.32).
_SQLITE_ROWS_PER_STATEMENT = (
    32766 // len(USAGE_COLUMNS) if sqlite3.sqlite_version_info >= (3, 32) else 999 // len(USAGE_COLUMNS)
)


def _utc(when: float) -> datetime:
    return _EPOCH + timedelta(seconds=when)


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
        self._second = -1
        self._second_text = ""
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
        except (OSError, TimeoutError, sa.exc.SQLAlchemyError) as exc:
            raise DatabaseUnavailable(f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}") from exc

    async def migrate(self) -> None:
        """Bring the schema to the newest revision; safe to run from several replicas at once."""
        path = self.sqlite_path
        if path is None:
            await self._bounded(self._migrate())
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Replicas sharing one SQLite file take turns; PostgreSQL has its own lock in env.py.
        lock = await asyncio.to_thread(_locked, path.with_name(path.name + ".migrate-lock"))
        try:
            await self._bounded(self._migrate())
        finally:
            lock.close()

    async def _migrate(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(_upgrade)

    async def ping(self) -> None:
        async def probe() -> None:
            async with self.engine.connect() as connection:
                await connection.execute(sa.text("SELECT 1"))

        await self._bounded(probe())

    async def insert_usage(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert usage rows (values in ``USAGE_COLUMNS`` order, ``created_at`` as a UNIX time) in one
        transaction; a row whose id is already stored is skipped."""
        if self.dialect != "sqlite":
            values = [(row[0], row[1], _utc(row[2]), *row[3:]) for row in rows]

            async def insert() -> None:
                async with self.engine.begin() as connection:
                    await connection.exec_driver_sql(self._insert_sql, values)

            await self._bounded(insert())
            return
        stamp = self._sqlite_time
        width = len(USAGE_COLUMNS)
        flat: list[Any] = []
        for row in rows:
            flat.extend(row)
        for index in range(2, len(flat), width):
            flat[index] = stamp(flat[index])
        # Many rows to one statement: sqlite3's executemany lets go of the GIL and takes it back for every row,
        # and each time it has to wait for the event loop's thread, which then waits for it.
        step = _SQLITE_ROWS_PER_STATEMENT * width

        async def insert_sqlite() -> None:
            async with self.engine.begin() as connection:
                for start in range(0, len(flat), step):
                    chunk = flat[start : start + step]
                    await connection.exec_driver_sql(self._rows_sql(len(chunk) // width), tuple(chunk))

        await self._bounded(insert_sqlite())

    def _rows_sql(self, count: int) -> str:
        sql = self._multi_row_sql.get(count)
        if sql is None:
            one = "(" + ", ".join(["?"] * len(USAGE_COLUMNS)) + ")"
            head, _, tail = self._insert_sql.partition(one)
            assert tail, self._insert_sql
            sql = self._multi_row_sql[count] = head + ", ".join([one] * count) + tail
        return sql

    def _sqlite_time(self, when: float) -> str:
        # The text SQLAlchemy's DateTime keeps in SQLite (so that reports compare like with like), made down to
        # the second once a second.
        second = int(when)
        if second != self._second:
            self._second = second
            self._second_text = (_EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self._second_text}.{int((when - second) * 1_000_000):06d}"

    async def usage_report(
        self, by: Sequence[str], since: datetime | None = None, until: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Requests, errors and tokens grouped by ``by`` (names from ``REPORT_DIMENSIONS``), oldest day first."""
        keys = [REPORT_DIMENSIONS[name].label(name) for name in by]
        query = sa.select(
            *keys,
            sa.func.count().label("requests"),
            sa.func.count(usage_log.c.error_code).label("errors"),
            sa.func.coalesce(sa.func.sum(usage_log.c.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(usage_log.c.completion_tokens), 0).label("completion_tokens"),
        )
        if since is not None:
            query = query.where(usage_log.c.created_at >= since)
        if until is not None:
            query = query.where(usage_log.c.created_at < until)
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
        await self.engine.dispose()


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets the usage report read while the gateway writes; NORMAL sync is still safe against crashes in WAL.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
