"""Alembic's entry: run by the gateway at startup with a connection, or by the ``alembic`` command with a URL."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.storage.tables import metadata

# Any constant will do: it only has to be the same in every gateway replica.
_MIGRATION_LOCK = 0x6761_7465_7761_79


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Replicas starting together would otherwise race to create the same tables.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
_connection = context.config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
else:
    _url = os.environ.get("INFERENCE_GATEWAY_DATABASE_URL") or context.config.get_main_option("sqlalchemy.url")
    assert _url, "set INFERENCE_GATEWAY_DATABASE_URL or sqlalchemy.url"
    asyncio.run(_run_from_url(_url))
