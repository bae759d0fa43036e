"""The batch jobs and files in the database (SQLAlchemy Core on the gateway's ``Database``)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gateway.batches.jobs import ACTIVE, BatchJob, StoredFile
from gateway.storage.database import Database, DatabaseUnavailable
from gateway.storage.tables import batches, files


class BatchStore:
    """Reads and writes ``batches`` and ``files``; every call is one short transaction."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def _execute(self, statement: sa.Executable) -> None:
        try:
            async with self.database.engine.begin() as connection:
                await connection.execute(statement)
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise _unavailable(exc) from exc

    async def _rows(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        try:
            async with self.database.engine.connect() as connection:
                result = await connection.execute(query)
                return [dict(row._mapping) for row in result]
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise _unavailable(exc) from exc

    async def add(self, job: BatchJob) -> None:
        await self._execute(sa.insert(batches).values(**vars(job)))

    async def get(self, batch_id: str) -> BatchJob | None:
        rows = await self._rows(sa.select(batches).where(batches.c.id == batch_id))
        return BatchJob(**rows[0]) if rows else None

    async def update(self, batch_id: str, **changes: Any) -> None:
        await self._execute(sa.update(batches).where(batches.c.id == batch_id).values(**changes))

    async def owned(
        self, username: str, *, status: str | None = None, after: BatchJob | None = None, limit: int = 20
    ) -> list[BatchJob]:
        """The user's batches, newest first; ``after`` is the last one of the previous page."""
        query = sa.select(batches).where(batches.c.username == username)
        if status is not None:
            query = query.where(batches.c.status == status)
        if after is not None:
            query = query.where(
                sa.or_(
                    batches.c.created_at < after.created_at,
                    sa.and_(batches.c.created_at == after.created_at, batches.c.id < after.id),
                )
            )
        query = query.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit)
        return [BatchJob(**row) for row in await self._rows(query)]

    async def active_count(self, username: str) -> int:
        query = sa.select(sa.func.count().label("count")).where(
            batches.c.username == username, batches.c.status.in_(ACTIVE)
        )
        return int((await self._rows(query))[0]["count"])

    async def unfinished(self) -> list[BatchJob]:
        query = sa.select(batches).where(batches.c.status.in_(ACTIVE)).order_by(batches.c.created_at)
        return [BatchJob(**row) for row in await self._rows(query)]

    async def add_file(self, stored: StoredFile) -> None:
        await self._execute(sa.insert(files).values(**vars(stored)))

    async def file(self, file_id: str) -> StoredFile | None:
        rows = await self._rows(sa.select(files).where(files.c.id == file_id))
        return StoredFile(**rows[0]) if rows else None

    async def delete_file(self, file_id: str) -> None:
        await self._execute(sa.delete(files).where(files.c.id == file_id))

    async def active_reading(self, file_id: str) -> str | None:
        """The id of an active batch whose input is ``file_id``, if any."""
        query = sa.select(batches.c.id).where(batches.c.input_file_id == file_id, batches.c.status.in_(ACTIVE))
        rows = await self._rows(query.limit(1))
        return str(rows[0]["id"]) if rows else None


def _unavailable(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}")
