"""The batch jobs and files in the database (SQLAlchemy Core on the gateway's ``Database``)."""

from __future__ import annotations

import time
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

    async def add_within(self, job: BatchJob, limit: int) -> bool:
        """Add ``job`` unless its user already has ``limit`` active batches; False when refused.

        The count and the insert are one step for every replica sharing the database: a transaction-scoped
        advisory lock per user on PostgreSQL (its snapshots alone would let two submissions both count room for
        one), and on SQLite a single statement, which the database's one writer at a time makes atomic.
        """
        values = vars(job)
        room = (
            sa.select(sa.func.count())
            .select_from(batches)
            .where(batches.c.username == job.username, batches.c.status.in_(ACTIVE))
            .scalar_subquery()
            < limit
        )
        row = sa.select(*[sa.literal(value, batches.c[name].type) for name, value in values.items()]).where(room)
        statement = sa.insert(batches).from_select(list(values), row)
        try:
            async with self.database.engine.begin() as connection:
                if self.database.dialect == "postgresql":
                    await connection.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext("batches:" + job.username)))
                    )
                return bool((await connection.execute(statement)).rowcount)
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise _unavailable(exc) from exc

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

    async def claim(self, owner: str, seconds: float, limit: int) -> list[str]:
        """Lease to ``owner`` for ``seconds`` up to ``limit`` active batches that no live lease holds, oldest first.

        Replicas claiming at once skip the rows another is claiming (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
        SQLite runs one writer at a time), and the lease condition is checked again on the rows updated.
        """
        now = time.time()
        free = sa.and_(
            batches.c.status.in_(ACTIVE),
            sa.or_(batches.c.lease_owner.is_(None), batches.c.lease_expires_at < now),
        )
        chosen = (
            sa.select(batches.c.id)
            .where(free)
            .order_by(batches.c.created_at, batches.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        statement = (
            sa.update(batches)
            .where(batches.c.id.in_(chosen.scalar_subquery()), free)
            .values(lease_owner=owner, lease_expires_at=now + seconds)
            .returning(batches.c.id)
        )
        try:
            async with self.database.engine.begin() as connection:
                return [str(row[0]) for row in await connection.execute(statement)]
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise _unavailable(exc) from exc

    async def renew(self, owner: str, batch_ids: list[str], seconds: float) -> dict[str, str]:
        """Extend ``owner``'s leases on ``batch_ids``; the status of each it still holds (a lapsed lease may be
        gone)."""
        if not batch_ids:
            return {}
        statement = (
            sa.update(batches)
            .where(batches.c.id.in_(batch_ids), batches.c.lease_owner == owner)
            .values(lease_expires_at=time.time() + seconds)
            .returning(batches.c.id, batches.c.status)
        )
        try:
            async with self.database.engine.begin() as connection:
                return {str(row[0]): str(row[1]) for row in await connection.execute(statement)}
        except (OSError, sa.exc.SQLAlchemyError) as exc:
            raise _unavailable(exc) from exc

    async def release(self, owner: str, batch_id: str) -> None:
        """Give up ``owner``'s lease on ``batch_id`` so that another replica may take it at once."""
        await self._execute(
            sa.update(batches)
            .where(batches.c.id == batch_id, batches.c.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )

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
