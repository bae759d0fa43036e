"""The usage log's parts: token counts from streams, the batch writer, the spool while the database is down."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.accounting.record import FinishedRequest, RequestRecord
from gateway.accounting.recorder import UsageRecorder
from gateway.accounting.report import as_csv, as_table, parse_day, parse_dimensions
from gateway.accounting.streams import for_client, take_usage
from gateway.storage.database import Database, DatabaseUnavailable


def chunk(content: str | None = None, usage: dict[str, int] | None = None, *, null_usage: bool = False) -> bytes:
    body: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    body["choices"] = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    if usage is not None:
        body["usage"] = usage
    elif null_usage:
        body["usage"] = None
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
DONE = b"data: [DONE]\n\n"


def record() -> RequestRecord:
    return RequestRecord("POST", "/resource_server/v1/chat/completions", "127.0.0.1")


def test_the_usage_chunk_is_counted_and_dropped_when_the_client_did_not_ask() -> None:
    seen = record()
    seen.keep_usage = False
    tail = chunk("b", null_usage=True) + chunk(usage=USAGE) + DONE
    out = for_client(tail, seen)
    assert out == chunk("b") + DONE
    assert (seen.prompt_tokens, seen.completion_tokens) == (7, 2)


def test_the_usage_chunk_is_kept_when_the_client_asked() -> None:
    seen = record()
    tail = chunk("b", null_usage=True) + chunk(usage=USAGE) + DONE
    assert for_client(tail, seen) == tail
    assert seen.tokens == 9


def test_events_without_usage_pass_untouched_and_unparsed() -> None:
    seen = record()
    events = chunk("a") + chunk("b")
    assert take_usage(events, seen, keep=False) is events
    assert seen.prompt_tokens is None


def test_a_usage_chunk_alone_becomes_nothing() -> None:
    seen = record()
    assert take_usage(chunk(usage=USAGE), seen, keep=False) == b""
    assert seen.completion_tokens == 2


def test_usage_on_a_content_chunk_is_counted_and_the_chunk_kept() -> None:
    seen = record()
    event = b'data: {"choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n'
    assert take_usage(event, seen, keep=False) == event
    assert seen.tokens == 2


def finished(n: int, user: str = "alice") -> FinishedRequest:
    done = record()
    done.request_id, done.user, done.model, done.op = f"req-{n}", user, "m", "chat/completions"
    done.cluster, done.framework, done.transport, done.status = "local", "vllm", "direct", 200
    done.prompt_tokens, done.completion_tokens, done.duration = 3, 4, 0.01
    return done.finished()


class FlakyDatabase(Database):
    """A real SQLite database that can be made to fail like one that is down."""

    down = False

    async def migrate(self) -> None:
        if self.down:
            raise DatabaseUnavailable("OSError: connection refused")
        await super().migrate()

    async def insert_usage(self, rows: Any) -> None:
        if self.down:
            raise DatabaseUnavailable("OSError: connection refused")
        await super().insert_usage(rows)


def stored(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return sorted(row[0] for row in connection.execute("SELECT request_id FROM usage_log"))


def recorder(tmp_path: Path, **options: Any) -> tuple[UsageRecorder, FlakyDatabase]:
    database = FlakyDatabase(f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}")
    settings = {"queue_size": 100, "batch_size": 10, "flush_interval": 0.02, "retry_interval": 0.05, **options}
    return UsageRecorder(database, tmp_path / "spool.jsonl", **settings), database


async def wait_for(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_rows_are_written_in_batches_off_the_request_path(tmp_path: Path) -> None:
    usage, database = recorder(tmp_path)
    await usage.start()
    for n in range(25):
        usage.add(finished(n))
    await wait_for(lambda: usage.written == 25)
    await usage.close()
    await database.close()
    assert stored(tmp_path / "usage.db") == sorted(f"req-{n}" for n in range(25))


async def test_rows_go_to_the_spool_while_the_database_is_down_and_are_replayed_once_it_is_back(
    tmp_path: Path,
) -> None:
    usage, database = recorder(tmp_path)
    await usage.start()
    usage.add(finished(0))
    await wait_for(lambda: usage.written == 1)
    database.down = True
    for n in range(1, 31):
        usage.add(finished(n))
        await asyncio.sleep(0.002)
    await wait_for(lambda: usage.spooled == 30)
    spooled = [json.loads(line)["request_id"] for line in (tmp_path / "spool.jsonl").read_text().splitlines()]
    assert sorted(spooled) == sorted(f"req-{n}" for n in range(1, 31))
    assert not usage.database_up
    database.down = False
    usage.add(finished(31))
    await wait_for(lambda: usage.written == 32)
    assert not (tmp_path / "spool.jsonl").exists()
    await usage.close()
    await database.close()
    assert stored(tmp_path / "usage.db") == sorted(f"req-{n}" for n in range(32))


async def test_rows_left_at_shutdown_are_spooled_and_replayed_by_the_next_start(tmp_path: Path) -> None:
    usage, database = recorder(tmp_path, flush_interval=60)
    database.down = True
    await usage.start()
    for n in range(5):
        usage.add(finished(n))
    await usage.close()
    assert len((tmp_path / "spool.jsonl").read_text().splitlines()) == 5
    database.down = False
    again = UsageRecorder(
        database, tmp_path / "spool.jsonl", queue_size=10, batch_size=2, flush_interval=60, retry_interval=1
    )
    await again.start()
    await again.close()
    await database.close()
    assert stored(tmp_path / "usage.db") == [f"req-{n}" for n in range(5)]


async def test_a_replay_stored_twice_is_stored_once(tmp_path: Path) -> None:
    usage, database = recorder(tmp_path)
    database.down = True
    await usage.start()
    for n in range(3):
        usage.add(finished(n))
    await wait_for(lambda: usage.spooled == 3)
    copy = (tmp_path / "spool.jsonl").read_bytes()
    database.down = False
    await wait_for(lambda: usage.written == 3)
    # As if the gateway had died after the insert but before it removed the spool.
    (tmp_path / "spool.jsonl").write_bytes(copy)
    await usage.close()
    again, _ = recorder(tmp_path)
    await again.start()
    await again.close()
    await database.close()
    assert stored(tmp_path / "usage.db") == ["req-0", "req-1", "req-2"]


class HeldDatabase(FlakyDatabase):
    """Holds its first insert until the test lets it go: a replay caught in the middle."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.inserting = asyncio.Event()
        self.go_on = asyncio.Event()

    async def insert_usage(self, rows: Any) -> None:
        self.inserting.set()
        await self.go_on.wait()
        await super().insert_usage(rows)


async def test_replicas_sharing_a_spool_store_every_row_once(tmp_path: Path) -> None:
    # Two replicas' writers, one spool file (their shared state folder), one database.
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"
    settings: dict[str, Any] = {"queue_size": 100, "batch_size": 5, "flush_interval": 0.02, "retry_interval": 0.05}
    first_db, second_db = HeldDatabase(url), FlakyDatabase(url)
    first_db.down = second_db.down = True
    first = UsageRecorder(first_db, tmp_path / "spool.jsonl", **settings)
    second = UsageRecorder(second_db, tmp_path / "spool.jsonl", **settings)
    await first.start()
    await second.start()
    for n in range(20):
        first.add(finished(n))
        second.add(finished(100 + n))
    await wait_for(lambda: first.spooled == 20 and second.spooled == 20)
    # The first replica's database is back: it replays the spool. In the middle of that replay the second,
    # its database still down, spools more rows.
    first_db.down = False
    await asyncio.wait_for(first_db.inserting.wait(), 5)
    for n in range(20, 30):
        second.add(finished(100 + n))
    await asyncio.sleep(0.3)
    first_db.go_on.set()
    await wait_for(lambda: second.spooled == 30)
    second_db.down = False
    second.add(finished(130))
    await wait_for(lambda: first.written + second.written >= 51, seconds=20)
    await first.close()
    await second.close()
    await first_db.close()
    await second_db.close()
    assert stored(tmp_path / "usage.db") == sorted(
        [f"req-{n}" for n in range(20)] + [f"req-{100 + n}" for n in range(31)]
    )


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    usage, database = recorder(tmp_path, queue_size=3, flush_interval=60, batch_size=100)
    for n in range(5):
        usage.add(finished(n))
    assert (usage.depth, usage.dropped) == (3, 2)
    await database.close()


async def test_the_report_groups_by_user_model_and_day(tmp_path: Path) -> None:
    usage, database = recorder(tmp_path)
    await usage.start()
    for n in range(4):
        usage.add(finished(n, user="alice" if n < 3 else "bob"))
    failed = finished(9, user="bob")._replace(
        status=503, error_code="backend_unavailable", prompt_tokens=None, completion_tokens=None
    )
    usage.add(failed)
    await wait_for(lambda: usage.written == 5)
    rows = await database.usage_report(["user", "model"])
    assert rows == [
        {
            "user": "alice",
            "model": "m",
            "requests": 3,
            "errors": 0,
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
        },
        {
            "user": "bob",
            "model": "m",
            "requests": 2,
            "errors": 1,
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "total_tokens": 7,
        },
    ]
    (day,) = {row["day"] for row in await database.usage_report(["day"])}
    assert await database.usage_report(["user"], since=parse_day(day), until=parse_day(day)) == []
    csv = as_csv(rows, ["user", "model"])
    assert csv.splitlines()[0] == "user,model,requests,errors,prompt_tokens,completion_tokens,total_tokens"
    assert csv.splitlines()[1] == "alice,m,3,0,9,12,21"
    table = as_table(rows, ["user", "model"])
    assert table.splitlines()[0].split() == [
        "user",
        "model",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    ]
    await usage.close()
    await database.close()


def test_report_options_are_checked() -> None:
    assert parse_dimensions("user, day,user") == ["user", "day"]
    with pytest.raises(ValueError, match="cannot group by colour"):
        parse_dimensions("user,colour")
    with pytest.raises(ValueError, match="not a date"):
        parse_day("yesterday")
    assert parse_day("2025-01-31").isoformat() == "2025-01-31T00:00:00"
