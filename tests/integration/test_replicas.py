"""Two gateway replicas sharing one database: batches are shared work, and a replica that dies loses its share."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute_functions.model_server import ModelServer
from gateway.simulator import command as simulator_command
from tests.databases import database_settings
from tests.integration.test_batches import (
    HEADERS,
    MODEL,
    answered,
    batch_settings,
    question,
    submit,
    wait_for,
    write_lines,
)
from tests.support import api_url, endpoint, forget_redis_keys, gateway, simulator


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    # 20 ms a request and 8 in flight per batch: a few hundred lines a second, slow enough to kill a replica mid-way.
    with simulator("--ttft", "0.02") as server:
        yield server


def replica_config(backend: ModelServer, root: Path, database: dict[str, Any], concurrency: int = 8) -> dict[str, Any]:
    return {
        "auth": {"providers": ["dev"]},
        "endpoints": [endpoint(backend.base_url, [MODEL])],
        "batches": batch_settings(root, concurrency=concurrency, max_active_per_user=2, lease_seconds=2),
        "database": database,
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Shared by both replicas: the SQLite file in their common state folder, or a scratch PostgreSQL database."""
    with database_settings(request.param) as settings:
        yield settings


def two_replicas(stack: ExitStack, config: dict[str, Any], tmp_path: Path) -> tuple[ModelServer, ModelServer]:
    # One state folder for both, as a shared filesystem gives replicas on several machines.
    return stack.enter_context(gateway(config, tmp_path)), stack.enter_context(gateway(config, tmp_path))


def test_10000_lines_whose_replica_is_killed_are_finished_by_the_other_answering_each_once(
    backend: ModelServer, database: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "scratch"
    lines = 10_000
    source = write_lines(root / "input.jsonl", [question(index) for index in range(lines)])
    with ExitStack() as stack:
        first, second = two_replicas(stack, replica_config(backend, root, database, concurrency=32), tmp_path)
        created = submit(first, input_file_path=str(source), output_folder_path=str(root / "out"), model=MODEL)
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]
        seen = wait_for(second, batch_id, lambda batch: batch["request_counts"]["completed"] >= 2000)
        assert seen["status"] == "in_progress", seen
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
        at_kill = len(answered(root / "out" / batch_id))
        assert at_kill < lines
        batch = wait_for(second, batch_id, timeout=120)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": lines, "completed": lines, "failed": 0}
    done = answered(root / "out" / batch_id)
    assert sorted(done) == list(range(1, lines + 1))


def test_the_active_batch_limit_holds_across_replicas_and_either_cancels_a_batch(
    backend: ModelServer, database: dict[str, Any], tmp_path: Path
) -> None:
    root = tmp_path / "scratch"
    source = write_lines(root / "input.jsonl", [question(index) for index in range(3000)])
    with ExitStack() as stack:
        replicas = two_replicas(stack, replica_config(backend, root, database), tmp_path)
        with ThreadPoolExecutor(6) as pool:
            responses = list(
                pool.map(
                    lambda index: submit(
                        replicas[index % 2],
                        input_file_path=str(source),
                        output_folder_path=str(root / "out"),
                        model=MODEL,
                    ),
                    range(6),
                )
            )
        accepted = [response.json()["id"] for response in responses if response.status_code == 200]
        refused = [response for response in responses if response.status_code == 429]
        assert len(accepted) == 2 and len(refused) == 4, [response.text for response in responses]
        assert all(response.json()["error"]["code"] == "too_many_active_batches" for response in refused)
        # Each batch cancelled through both replicas: whichever holds it stops it, and nothing more is written.
        for batch_id in accepted:
            wait_for(replicas[0], batch_id, lambda batch: batch["request_counts"]["completed"] >= 100)
        for index, batch_id in enumerate(accepted):
            cancelled = httpx.post(f"{api_url(replicas[index])}/batches/{batch_id}/cancel", headers=HEADERS, timeout=30)
            assert cancelled.status_code == 200, cancelled.text
        for batch_id in accepted:
            batch = wait_for(replicas[1], batch_id, timeout=30)
            assert batch["status"] == "cancelled", batch
            done = answered(root / "out" / batch_id)
            assert len(done) == len(set(done)) == batch["request_counts"]["completed"] < 3000
        time.sleep(1)
        assert all(
            len(answered(root / "out" / batch_id)) == status["request_counts"]["completed"]
            for batch_id in accepted
            for status in [wait_for(replicas[0], batch_id)]
        )


def test_a_stream_whose_worker_posts_to_the_other_replica_reaches_its_client(tmp_path: Path) -> None:
    relay = {
        "redis_url": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "redis_prefix": f"test-replicas-relay-{os.urandom(4).hex()}:",
    }
    receiving = {"auth": {"providers": ["dev"]}, "endpoints": [endpoint("http://127.0.0.1:9/v1", [MODEL])]}
    for home in ("a", "b"):
        (tmp_path / home).mkdir()
    with ExitStack() as stack:
        stack.callback(forget_redis_keys, relay["redis_url"], relay["redis_prefix"])
        other = stack.enter_context(gateway({**receiving, "relay": relay}, tmp_path / "b"))
        launch = simulator_command(MODEL, options=("--tpot", "0.005"))
        config = {
            "auth": {"providers": ["dev"]},
            # The first request waits for the worker pool and the model server it launches.
            "federation": {"when_not_hot": "hold"},
            "endpoints": [
                {
                    "cluster": "local",
                    "framework": "vllm",
                    "models": [MODEL],
                    "transport": "parsl",
                    "worker_model_server": {"command": launch, "state_dir": str(tmp_path / "servers")},
                    "parsl": {"provider": "local", "max_workers_per_node": 1},
                }
            ],
            # The workers of this replica post their streams to the other one.
            "relay": {**relay, "url": f"http://{other.host}:{other.port}"},
        }
        with gateway(config, tmp_path / "a") as first:
            response = httpx.post(
                f"{api_url(first)}/chat/completions",
                headers=HEADERS,
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Hi?"}],
                    "max_tokens": 20,
                    "stream": True,
                },
                timeout=120,
            )
    assert response.status_code == 200, response.text
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert sum(1 for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")) == 20


def test_sigterm_lets_streams_in_flight_finish_and_refuses_new_connections(tmp_path: Path) -> None:
    with simulator("--tpot", "0.01") as slow:
        config = {"auth": {"providers": ["dev"]}, "endpoints": [endpoint(slow.base_url, [MODEL])]}
        with gateway(config, tmp_path) as server, httpx.Client(headers=HEADERS, timeout=60) as session:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me."}], "max_tokens": 300}
            url = f"{api_url(server)}/chat/completions"
            with session.stream("POST", url, json={**body, "stream": True}) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert server.process is not None
                os.kill(server.process.pid, signal.SIGTERM)
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):
                    httpx.post(url, json=body, headers=HEADERS, timeout=5)
                rest = [line for line in lines if line.startswith("data: ")]
            assert stream.status_code == 200 and rest[-1] == "data: [DONE]"
            chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
            assert sum(1 for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"].get("content")) == 300
            # Once shut down, uvicorn ends the process by the signal it was sent, as the signal's default would.
            assert server.process.wait(timeout=30) == -signal.SIGTERM
