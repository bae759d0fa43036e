"""Who used what: usage rows, the usage report, metrics and logs, through a real gateway in front of a simulator.

The usage log is checked on SQLite (the default) and on PostgreSQL, including the database going away during a
load run and coming back: no request may fail and no row may be missing afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from compute_functions.model_server import ModelServer, free_port
from tests.databases import SHARED_POSTGRES, StuckDatabase, asyncpg_url, private_postgres, scratch_database
from tests.support import REPO, TOKEN, api_url, direct_config, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
AUTH = {"authorization": f"Bearer {TOKEN}"}
FAST_WRITES = {"flush_interval": 0.1, "retry_interval": 0.3, "timeout": 3}


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--tpot", "0.001", models=(MODEL, LLAMA)) as server:
        yield server


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("accounting")


def accounting_config(backend: ModelServer, **database: Any) -> dict[str, Any]:
    config = direct_config(
        endpoint(backend.base_url, [MODEL, LLAMA]),
        endpoint(f"http://127.0.0.1:{free_port()}/v1", ["offline-model"], cluster="dark"),
    )
    config["database"] = {**FAST_WRITES, **database}
    return config


@pytest.fixture(scope="module")
def front(backend: ModelServer, home: Path) -> Iterator[ModelServer]:
    config = {**accounting_config(backend), "admin": {"users": ["dev-user"]}}
    with gateway(config, home) as server:
        yield server


def sqlite_rows(path: Path) -> Callable[[], dict[str, dict[str, Any]]]:
    def read() -> dict[str, dict[str, Any]]:
        if not path.exists():
            return {}
        with sqlite3.connect(path) as connection:
            connection.row_factory = sqlite3.Row
            try:
                return {row["request_id"]: dict(row) for row in connection.execute("SELECT * FROM usage_log")}
            except sqlite3.OperationalError:
                return {}

    return read


def postgres_rows(url: str) -> Callable[[], dict[str, dict[str, Any]]]:
    async def fetch() -> dict[str, dict[str, Any]]:
        connection = await asyncpg.connect(url)
        try:
            return {row["request_id"]: dict(row) for row in await connection.fetch("SELECT * FROM usage_log")}
        finally:
            await connection.close()

    def read() -> dict[str, dict[str, Any]]:
        try:
            return asyncio.run(fetch())
        except (OSError, asyncpg.PostgresError):
            return {}

    return read


def wait_for_rows(read: Callable[[], dict[str, dict[str, Any]]], ids: set[str], seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        rows = read()
        if ids <= rows.keys() or time.monotonic() > deadline:
            missing = ids - rows.keys()
            assert not missing, f"{len(missing)} of {len(ids)} usage rows missing, e.g. {sorted(missing)[:3]}"
            return {rid: rows[rid] for rid in ids}
        time.sleep(0.1)


def rid(label: str) -> str:
    return f"{label}-{os.urandom(6).hex()}"


def chat(server: ModelServer, request_id: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{api_url(server)}/chat/completions",
        headers={**AUTH, "x-request-id": request_id},
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 5, **body},
        timeout=30,
    )


@pytest.fixture
def rows(home: Path) -> Callable[[set[str]], dict[str, Any]]:
    return lambda ids: wait_for_rows(sqlite_rows(home / "state" / "gateway.db"), ids)


# --- rows for every kind of request ----------------------------------------------------------------------------


def test_a_whole_answer_is_one_row_with_the_backends_token_counts(front: ModelServer, rows: Any) -> None:
    request_id = rid("whole")
    answer = chat(front, request_id, max_tokens=9)
    assert answer.status_code == 200 and answer.headers["x-request-id"] == request_id
    usage = answer.json()["usage"]
    row = rows({request_id})[request_id]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"], 9)
    assert row["username"] == "dev-user" and row["model"] == MODEL and row["endpoint"] == "chat/completions"
    assert (row["cluster"], row["framework"], row["transport"]) == ("local", "vllm", "direct")
    assert row["status"] == 200 and row["error_code"] is None and not row["stream"]
    assert row["time_to_first_token"] is None and 0 < row["duration"] < 10


def test_a_stream_is_counted_and_its_usage_chunk_kept_from_a_client_that_did_not_ask(
    front: ModelServer, rows: Any
) -> None:
    whole = chat(front, rid("reference"), max_tokens=12).json()["usage"]
    request_id = rid("stream")
    with httpx.stream(
        "POST",
        f"{api_url(front)}/chat/completions",
        headers={**AUTH, "x-request-id": request_id},
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 12, "stream": True},
    ) as response:
        raw = b"".join(response.iter_bytes())
    assert b'"usage"' not in raw
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["choices"] for event in events[:-1])
    row = rows({request_id})[request_id]
    assert row["stream"] and row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (whole["prompt_tokens"], 12)
    assert 0 < row["time_to_first_token"] <= row["duration"]


def test_a_client_that_asked_for_usage_in_its_stream_gets_it(front: ModelServer, rows: Any) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)
    request_id = rid("asked")
    stream = client.chat.completions.create(
        model=LLAMA,
        messages=QUESTION,
        max_tokens=7,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": request_id},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
    row = rows({request_id})[request_id]
    assert (row["model"], row["completion_tokens"]) == (LLAMA, 7)
    assert row["prompt_tokens"] == chunks[-1].usage.prompt_tokens


def test_completions_embeddings_and_failures_have_rows_too(front: ModelServer, rows: Any) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)
    completion, embedding, offline = rid("completion"), rid("embedding"), rid("offline")
    client.completions.create(
        model=MODEL, prompt="The future of AI is", max_tokens=4, extra_headers={"x-request-id": completion}
    )
    client.embeddings.create(
        model=MODEL, input=["first text", "second text"], extra_headers={"x-request-id": embedding}
    )
    failed = chat(front, offline, model="offline-model")
    assert failed.status_code == 503
    found = rows({completion, embedding, offline})
    assert (found[completion]["endpoint"], found[completion]["completion_tokens"]) == ("completions", 4)
    assert found[embedding]["endpoint"] == "embeddings" and found[embedding]["prompt_tokens"] > 0
    assert found[embedding]["completion_tokens"] == 0  # as vLLM reports it for embeddings
    assert (found[offline]["status"], found[offline]["error_code"]) == (503, "backend_unavailable")
    assert found[offline]["prompt_tokens"] is None


# --- reading it back -------------------------------------------------------------------------------------------


def test_admins_read_the_usage_report_as_json_and_csv(front: ModelServer, rows: Any) -> None:
    request_id = rid("report")
    assert chat(front, request_id).status_code == 200
    rows({request_id})
    base = f"http://127.0.0.1:{front.port}/resource_server/admin/usage"
    report = httpx.get(base, headers=AUTH, params={"by": "user,model"}).json()
    assert report["by"] == ["user", "model"]
    mine = {row["model"]: row for row in report["data"] if row["user"] == "dev-user"}
    assert mine[MODEL]["requests"] >= 1 and mine[MODEL]["total_tokens"] > 0
    csv = httpx.get(base, headers=AUTH, params={"by": "model,day", "format": "csv"})
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == "model,day,requests,errors,prompt_tokens,completion_tokens,total_tokens"
    bad = httpx.get(base, headers=AUTH, params={"by": "colour"})
    assert bad.status_code == 400 and "cannot group by colour" in bad.json()["error"]["message"]
    assert httpx.get(base).status_code == 401


def test_refused_requests_count_as_errors_in_the_usage_command(front: ModelServer, home: Path, rows: Any) -> None:
    unknown, invalid, answered = rid("unknown"), rid("invalid"), rid("answered")
    assert chat(front, unknown, model="no/such-model").status_code == 404
    assert chat(front, invalid, temperature=7).status_code == 400
    assert chat(front, answered).status_code == 200
    found = rows({unknown, invalid, answered})
    assert (found[unknown]["status"], found[unknown]["error_code"]) == (404, "model_not_found")
    assert found[invalid]["status"] == 400 and found[invalid]["error_code"]
    config = next(home.glob("gateway-*.yaml"))
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "usage", "--config", str(config), "--by", "model", "--format", "csv"],
        capture_output=True,
        text=True,
        env={**os.environ, "INFERENCE_GATEWAY_STATE_DIR": str(home / "state")},
        timeout=60,
    )
    report = {line.split(",")[0]: line.split(",") for line in done.stdout.splitlines()[1:]}
    assert report["(unknown model)"][1:3] == ["1", "1"]  # one request, one error
    assert int(report[MODEL][2]) >= 1  # the refused temperature


def test_the_usage_command_prints_a_table_and_csv(front: ModelServer, home: Path, rows: Any) -> None:
    request_id = rid("cli")
    assert chat(front, request_id).status_code == 200
    rows({request_id})
    config = next(home.glob("gateway-*.yaml"))
    env = {**os.environ, "INFERENCE_GATEWAY_STATE_DIR": str(home / "state")}

    def usage(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "usage", "--config", str(config), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    table = usage("--by", "user,model")
    assert table.splitlines()[0].split()[:3] == ["user", "model", "requests"]
    assert any(line.startswith("dev-user") and MODEL in line for line in table.splitlines())
    csv = usage("--by", "day", "--format", "csv", "--since", "2000-01-01").splitlines()
    assert csv[0].startswith("day,requests") and len(csv) >= 2
    assert usage("--by", "user", "--since", "2999-01-01").strip().endswith("(no usage recorded)")


def test_metrics_parse_with_prometheus_clients_parser(front: ModelServer) -> None:
    chat(front, rid("metrics"))
    with httpx.stream(
        "POST",
        f"{api_url(front)}/chat/completions",
        headers=AUTH,
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True},
    ) as response:
        response.read()
    text = httpx.get(f"http://127.0.0.1:{front.port}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    route = "/resource_server/v1/chat/completions"
    served = [
        sample
        for sample in families["gateway_requests"].samples
        if sample.labels == {"route": route, "model": MODEL, "cluster": "local", "status": "200"}
    ]
    assert served and served[0].value >= 2
    counts = {
        sample.name: sample.value
        for sample in families["gateway_time_to_first_token_seconds"].samples
        if sample.labels.get("model") == MODEL and "le" not in sample.labels
    }
    assert counts["gateway_time_to_first_token_seconds_count"] >= 1
    tokens = {
        sample.labels["kind"]: sample.value
        for sample in families["gateway_tokens"].samples
        if sample.labels["model"] == MODEL
    }
    assert tokens["completion"] >= 8 and tokens["prompt"] > 0
    streams = {sample.labels["outcome"]: sample.value for sample in families["gateway_relay_streams"].samples}
    assert streams["completed"] >= 1
    for name in (
        "gateway_requests_in_flight",
        "gateway_relay_streams_open",
        "gateway_usage_queue_depth",
        "gateway_usage_rows_dropped",
        "gateway_endpoint_state",
        "gateway_request_duration_seconds",
    ):
        assert name in families, name
    assert {sample.value for sample in families["gateway_usage_rows_dropped"].samples} == {0.0}


def served_count(server: ModelServer) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    route = "/resource_server/v1/chat/completions"
    return sum(
        sample.value
        for sample in families["gateway_requests"].samples
        if sample.labels == {"route": route, "model": MODEL, "cluster": "local", "status": "200"}
    )


def writer_pid(server: ModelServer) -> int:
    assert server.process is not None
    children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout
    (pid,) = children.split()
    return int(pid)


def test_metrics_alone_are_counted_by_the_writer_process_and_outlive_it(backend: ModelServer, tmp_path: Path) -> None:
    config = accounting_config(backend, usage_log=False)
    config["logging"] = {"access_log": False}
    with gateway(config, tmp_path) as server:
        for _ in range(3):
            assert chat(server, rid("counted")).status_code == 200
        # Each scrape waits for the writer to have counted everything finished before it: exact counts.
        assert served_count(server) == 3
        first = writer_pid(server)
        os.kill(first, 9)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.2)
            with contextlib.suppress(ValueError):
                if writer_pid(server) != first:
                    break
        else:
            raise AssertionError("the usage writer was not started again")
        for _ in range(2):
            assert chat(server, rid("counted")).status_code == 200
        # What the first writer had counted stays with the gateway; the new one counts on from there.
        assert served_count(server) == 5


def test_logs_are_json_lines_with_the_request_id_and_no_token(front: ModelServer) -> None:
    request_id = rid("logged")
    answer = chat(front, request_id, messages=[{"role": "user", "content": "a private question"}])
    secret = answer.json()["choices"][0]["message"]["content"]
    time.sleep(0.5)
    lines = front.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    others = [line for line in lines if not line.startswith("{")]
    # The one plain-text banner is the dev token hint for a person at the terminal.
    assert all("Dev auth is on" in line or "export MY_TOKEN" in line for line in others), others
    (access,) = [record for record in records if record.get("request_id") == request_id]
    assert access["logger"] == "gateway.access" and access["status"] == 200 and access["user"] == "dev-user"
    assert access["completion_tokens"] == 5 and access["model"] == MODEL
    text = "\n".join(lines)
    assert TOKEN not in text and secret not in text and "a private question" not in text


def test_readiness_checks_the_database_and_the_transports(front: ModelServer) -> None:
    ready = httpx.get(f"http://127.0.0.1:{front.port}/resource_server/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and ready.json()["checks"]["database"] == "ok"
    assert "transport direct" in ready.json()["checks"]


# --- the database goes away during a load run ------------------------------------------------------------------


def load_run(server: ModelServer, seconds: float, outage: Callable[[], None]) -> dict[str, int]:
    """Requests from 8 clients for ``seconds`` while ``outage`` runs; the status of each, by request id."""
    statuses: dict[str, int] = {}
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(headers=AUTH, timeout=30) as session:
            while not stop.is_set():
                request_id = rid("load")
                body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": len(statuses) % 2 == 0}
                response = session.post(
                    f"{api_url(server)}/chat/completions", json=body, headers={"x-request-id": request_id}
                )
                response.read()
                statuses[request_id] = response.status_code

    with ThreadPoolExecutor(8) as pool:
        clients = [pool.submit(client) for _ in range(8)]
        try:
            outage()
            time.sleep(seconds)
        finally:
            stop.set()
        for running in clients:
            running.result()
    return statuses


def test_sqlite_locked_during_a_load_run_loses_no_request_and_no_row(backend: ModelServer, tmp_path: Path) -> None:
    database = tmp_path / "state" / "gateway.db"
    with gateway(accounting_config(backend), tmp_path) as server:
        assert chat(server, rid("warm")).status_code == 200

        def outage() -> None:
            time.sleep(0.5)
            with sqlite3.connect(database, isolation_level=None, timeout=10) as blocker:
                blocker.execute("BEGIN EXCLUSIVE")
                time.sleep(3)
                blocker.execute("ROLLBACK")

        statuses = load_run(server, 1.0, outage)
        assert len(statuses) > 100 and set(statuses.values()) == {200}
        wait_for_rows(sqlite_rows(database), set(statuses))
        metrics = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    spooled = [line for line in metrics.splitlines() if line.startswith("gateway_usage_rows_spooled_total")]
    assert float(spooled[0].split()[-1]) > 0, "the outage did not reach the usage writer"
    assert not (tmp_path / "state" / "usage-spool.jsonl").exists()


def test_postgresql_rows_for_whole_and_streamed_requests(backend: ModelServer, tmp_path: Path) -> None:
    with scratch_database() as url, gateway(accounting_config(backend, url=asyncpg_url(url)), tmp_path) as server:
        whole, streamed = rid("pg-whole"), rid("pg-stream")
        assert chat(server, whole, max_tokens=6).status_code == 200
        with httpx.stream(
            "POST",
            f"{api_url(server)}/chat/completions",
            headers={**AUTH, "x-request-id": streamed},
            json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True},
        ) as response:
            assert b'"usage"' not in response.read()
        found = wait_for_rows(postgres_rows(url), {whole, streamed})
        assert found[whole]["completion_tokens"] == 6 and not found[whole]["stream"]
        assert found[streamed]["completion_tokens"] == 4 and found[streamed]["stream"]
        assert found[streamed]["prompt_tokens"] == found[whole]["prompt_tokens"]
        report = httpx.get(f"http://127.0.0.1:{server.port}/resource_server/admin/usage", headers=AUTH)
        assert report.status_code == 403 and report.json()["error"]["code"] == "admin_only"


def test_postgresql_stopped_during_a_load_run_loses_no_request_and_no_row(backend: ModelServer, tmp_path: Path) -> None:
    with (
        private_postgres() as postgres,
        gateway(accounting_config(backend, url=asyncpg_url(postgres.url)), tmp_path) as server,
    ):
        assert chat(server, rid("warm")).status_code == 200

        def outage() -> None:
            time.sleep(0.5)
            postgres.stop()
            time.sleep(2)
            assert httpx.get(f"http://127.0.0.1:{server.port}/resource_server/ready").status_code == 503
            postgres.start()

        statuses = load_run(server, 1.0, outage)
        assert len(statuses) > 100 and set(statuses.values()) == {200}
        wait_for_rows(postgres_rows(postgres.url), set(statuses))
        assert httpx.get(f"http://127.0.0.1:{server.port}/resource_server/ready").status_code == 200


# --- a database that accepts connections and never answers -----------------------------------------------------


def usage_counters(server: ModelServer) -> dict[str, float]:
    """The usage writer's counters from /metrics (a scrape waits for the writer's report)."""
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=30).text
    wanted = ("written", "spooled", "dropped")
    counters = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name in wanted:
                if sample.name == f"gateway_usage_rows_{name}_total":
                    counters[name] = sample.value
            if sample.name == "gateway_usage_database_up":
                counters["database_up"] = sample.value
    return counters


def wait_for_counters(server: ModelServer, done: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while not done(counters := usage_counters(server)):
        assert time.monotonic() < deadline, counters
        time.sleep(0.2)
    return counters


def test_a_hanging_database_spools_every_row_and_replays_them_when_it_answers(
    backend: ModelServer, tmp_path: Path
) -> None:
    with scratch_database() as url:
        stuck = StuckDatabase(5432)
        try:
            # The gateway starts while the database hangs: it waits out the timeout, then serves with the spool.
            config = accounting_config(backend, url=asyncpg_url(stuck.url(url)), timeout=1)
            with gateway(config, tmp_path) as server:
                assert httpx.get(f"http://127.0.0.1:{server.port}/resource_server/ready").status_code == 503
                first = {rid("hung") for _ in range(40)}
                assert {chat(server, request_id).status_code for request_id in first} == {200}
                counters = wait_for_counters(server, lambda seen: seen["spooled"] >= 40)
                assert counters == {"written": 0, "spooled": 40, "dropped": 0, "database_up": 0}

                stuck.flow()
                wait_for_rows(postgres_rows(url), first)
                counters = wait_for_counters(server, lambda seen: seen["written"] >= 40)
                assert counters == {"written": 40, "spooled": 40, "dropped": 0, "database_up": 1}

                # It hangs again with connections open: their rows go to the spool as well, and come back.
                stuck.hang()
                second = {rid("hung-again") for _ in range(40)}
                assert {chat(server, request_id).status_code for request_id in second} == {200}
                counters = wait_for_counters(server, lambda seen: seen["spooled"] >= 80)
                assert counters["database_up"] == 0 and counters["dropped"] == 0
                stuck.flow()
                wait_for_rows(postgres_rows(url), first | second)
                counters = wait_for_counters(server, lambda seen: seen["written"] >= 80)
                assert counters == {"written": 80, "spooled": 80, "dropped": 0, "database_up": 1}
                assert not (tmp_path / "state" / "usage-spool.jsonl").exists()
        finally:
            stuck.close()


def test_a_read_only_database_spools_every_row_and_replays_them_when_writable(
    backend: ModelServer, tmp_path: Path
) -> None:
    with scratch_database() as url:
        name = url.rsplit("/", 1)[1]

        async def admin(statement: str) -> None:
            connection = await asyncpg.connect(SHARED_POSTGRES)
            try:
                await connection.execute(statement)
            finally:
                await connection.close()

        with gateway(accounting_config(backend, url=asyncpg_url(url), timeout=2), tmp_path) as server:
            warm = rid("warm")
            assert chat(server, warm).status_code == 200
            wait_for_rows(postgres_rows(url), {warm})
            # Read-only from now on, for the gateway's open connections too: they are ended and made anew.
            asyncio.run(admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
            asyncio.run(admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            refused = {rid("read-only") for _ in range(30)}
            assert {chat(server, request_id).status_code for request_id in refused} == {200}
            counters = wait_for_counters(server, lambda seen: seen["spooled"] >= 30)
            assert counters == {"written": 1, "spooled": 30, "dropped": 0, "database_up": 0}
            asyncio.run(admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off'))
            asyncio.run(admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            wait_for_rows(postgres_rows(url), refused | {warm})
            counters = wait_for_counters(server, lambda seen: seen["written"] >= 31)
            assert counters == {"written": 31, "spooled": 30, "dropped": 0, "database_up": 1}


def test_kill_9_of_the_gateway_keeps_every_row_the_writer_was_handed(backend: ModelServer, tmp_path: Path) -> None:
    with gateway(accounting_config(backend), tmp_path) as server:
        assert server.process is not None
        ids = [rid("before-kill") for _ in range(800)]
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(lambda request_id: chat(server, request_id).status_code, ids)) == {200}
        writer = writer_pid(server)
        # Rows go to the writer within 10 ms of their answer: a kill 200 ms after the last answer loses none.
        time.sleep(0.2)
        os.kill(server.process.pid, 9)
        server.process.wait()
        # The writer sees the pipe close, stores what it holds and exits.
        deadline = time.monotonic() + 30
        while subprocess.run(["kill", "-0", str(writer)], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "the usage writer did not exit after the gateway died"
            time.sleep(0.1)
        wait_for_rows(sqlite_rows(tmp_path / "state" / "gateway.db"), set(ids), seconds=1)


def test_a_slow_database_gets_every_row_once(backend: ModelServer, tmp_path: Path) -> None:
    with scratch_database() as url:
        slow = StuckDatabase(5432)
        slow.flow()
        slow.delay = 0.05  # each piece to or from PostgreSQL 50 ms late, every call well inside the 3 s timeout
        try:
            with gateway(accounting_config(backend, url=asyncpg_url(slow.url(url))), tmp_path) as server:
                ids = {rid("slow") for _ in range(30)}
                assert {chat(server, request_id).status_code for request_id in ids} == {200}
                wait_for_rows(postgres_rows(url), ids, seconds=60)
                counters = wait_for_counters(server, lambda seen: seen["written"] >= 30)
                # On a busy machine a call may still pass the timeout: its rows are spooled, then written once.
                assert counters["written"] == 30 and counters["dropped"] == 0 and counters["database_up"] == 1
                assert not (tmp_path / "state" / "usage-spool.jsonl").exists()
        finally:
            slow.close()
