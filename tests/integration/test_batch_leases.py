"""The batch leases and the active-batch limit in the database, as replicas race for them: several engines (one per
replica) on SQLite and on a scratch PostgreSQL database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.batches.jobs import BatchJob
from gateway.batches.store import BatchStore
from gateway.storage.database import Database
from tests.databases import asyncpg_url, scratch_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        return
    with scratch_database() as scratch:
        yield asyncpg_url(scratch)


def job(batch_id: str, username: str = "alice") -> BatchJob:
    now = int(time.time())
    return BatchJob(
        id=batch_id, username=username, status="queued", model="m", cluster="local", framework="vllm",
        endpoint=None, input_file_path="/in.jsonl", output_folder_path="/out", input_file_id=None,
        output_file_id=None, error_file_id=None, completion_window="24h", user_metadata={"team": "a"}, errors=None,
        total=1, completed=0, failed=0, attempts=0, created_at=now, expires_at=now + 3600,
    )  # fmt: skip


async def replicas(url: str, count: int) -> list[BatchStore]:
    stores = [BatchStore(Database(url)) for _ in range(count)]
    await stores[0].database.migrate()
    return stores


async def close(stores: list[BatchStore]) -> None:
    for store in stores:
        await store.database.close()


async def test_replicas_claiming_at_once_never_share_a_batch(url: str) -> None:
    stores = await replicas(url, 5)
    try:
        for index in range(20):
            assert await stores[0].add_within(job(f"batch_{index:02}", username=f"user{index}"), 1)
        claims = await asyncio.gather(*(store.claim(f"replica-{n}", 30, 3) for n, store in enumerate(stores)))
        claimed = [batch_id for claim in claims for batch_id in claim]
        assert len(claimed) == len(set(claimed)) == 15
        # Nothing held by a live lease is claimed again; the rest is.
        assert sorted(await stores[0].claim("late", 30, 20)) == sorted(
            {f"batch_{i:02}" for i in range(20)} - set(claimed)
        )
    finally:
        await close(stores)


async def test_a_lapsed_lease_goes_to_another_replica_and_its_holder_learns_it(url: str) -> None:
    stores = await replicas(url, 2)
    try:
        assert await stores[0].add_within(job("batch_a"), 1)
        assert await stores[0].claim("first", 0.5, 4) == ["batch_a"]
        assert await stores[1].claim("second", 30, 4) == []
        assert await stores[0].renew("first", ["batch_a"], 0.5) == {"batch_a": "queued"}
        await asyncio.sleep(0.6)
        assert await stores[1].claim("second", 30, 4) == ["batch_a"]
        assert await stores[0].renew("first", ["batch_a"], 30) == {}
        await stores[1].release("second", "batch_a")
        assert await stores[0].claim("first", 30, 4) == ["batch_a"]
    finally:
        await close(stores)


async def test_simultaneous_submissions_to_several_replicas_keep_the_active_limit(url: str) -> None:
    stores = await replicas(url, 4)
    try:
        added = await asyncio.gather(*(stores[index % 4].add_within(job(f"batch_{index}"), 3) for index in range(12)))
        assert added.count(True) == 3
        assert await stores[0].active_count("alice") == 3
        assert await stores[0].add_within(job("batch_other", username="bob"), 3)
    finally:
        await close(stores)
