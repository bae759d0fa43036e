"""The ``run_batch`` compute function on its own: killed and run again, refused files, a busy lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_functions.batch import LOCK, run_batch
from compute_functions.model_server import ModelServer
from tests.support import simulator

MODEL = "facebook/opt-125m"


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--ttft", "0.005") as server:
        yield server


def write_input(path: Path, count: int, extra: list[str] | None = None) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"q{index}"}], "max_tokens": 2}) for index in range(count)
    ]
    path.write_text("".join(line + "\n" for line in [*lines, *(extra or [])]))
    return path


def request(tmp_path: Path, backend: ModelServer, source: Path, **extra: Any) -> dict[str, Any]:
    return {
        "batch_id": "batch_test",
        "input": str(source),
        "output": str(tmp_path / "out" / "batch_test"),
        "allowed_roots": [str(tmp_path)],
        "model": MODEL,
        "backend_model": MODEL,
        "endpoint": None,
        "max_lines": 1_000_000,
        "max_line_bytes": 4096,
        "concurrency": 16,
        "time_budget": 60,
        "timeout": 30,
        "base_url": backend.base_url,
        **extra,
    }


def written(folder: Path) -> int:
    try:
        return (folder / "results.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def lines_of(folder: Path, name: str) -> list[int]:
    path = folder / name
    return [json.loads(line)["line"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_killed_at_any_moment_is_finished_by_the_next_without_repeats(
    tmp_path: Path, backend: ModelServer
) -> None:
    source = write_input(tmp_path / "input.jsonl", 6000)
    job = request(tmp_path, backend, source)
    folder = Path(job["output"])
    for target in (1000, 2500, 4000):
        child = subprocess.Popen(
            [sys.executable, "-m", "compute_functions.batch"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        assert child.stdin is not None
        child.stdin.write(json.dumps(job).encode())
        child.stdin.close()
        # Killed in the middle of its work, wherever that is: between checkpoints, or in the middle of a write.
        deadline = time.monotonic() + 60
        while written(folder) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    killed_with = len(lines_of(folder, "results.jsonl"))
    result = run_batch(job)
    assert result["state"] == "completed"
    assert (result["total"], result["completed"], result["failed"]) == (6000, 6000, 0)
    done = lines_of(folder, "results.jsonl")
    assert 0 < killed_with < 6000
    assert sorted(done) == list(range(1, 6001))
    assert run_batch(job)["state"] == "completed"
    assert len(lines_of(folder, "results.jsonl")) == 6000


def test_a_symlink_planted_in_the_batch_folder_is_refused(tmp_path: Path, backend: ModelServer) -> None:
    source = write_input(tmp_path / "input.jsonl", 3)
    victim = tmp_path.parent / f"{tmp_path.name}-victim.txt"
    victim.write_text("precious\n")
    job = request(tmp_path, backend, source)
    folder = Path(job["output"])
    folder.mkdir(parents=True)
    (folder / "results.jsonl").symlink_to(victim)
    try:
        result = run_batch(job)
        assert result["state"] == "failed"
        assert result["errors"][0]["code"] == "path_not_allowed"
        assert victim.read_text() == "precious\n"
    finally:
        victim.unlink()


def test_paths_outside_the_roots_are_refused_by_the_worker_too(tmp_path: Path, backend: ModelServer) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    source = write_input(tmp_path / "input.jsonl", 3)
    result = run_batch(request(tmp_path, backend, source, allowed_roots=[str(inside)]))
    assert result["state"] == "failed" and result["errors"][0]["code"] == "path_not_allowed"
    escape = request(tmp_path, backend, source, output=f"{tmp_path}/../{tmp_path.name}-escape/batch_test")
    assert run_batch(escape)["errors"][0]["code"] == "path_not_allowed"
    assert not (tmp_path.parent / f"{tmp_path.name}-escape").exists()


def test_a_second_run_of_the_same_batch_waits_for_the_lock(tmp_path: Path, backend: ModelServer) -> None:
    source = write_input(tmp_path / "input.jsonl", 3)
    job = request(tmp_path, backend, source, lock_wait=0.3)
    folder = Path(job["output"])
    folder.mkdir(parents=True)
    import fcntl

    holder = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert run_batch(job)["state"] == "busy"
    finally:
        os.close(holder)
    assert run_batch(job)["state"] == "completed"


def test_long_lines_fail_alone_and_a_changed_input_stops_the_batch(tmp_path: Path, backend: ModelServer) -> None:
    source = write_input(tmp_path / "input.jsonl", 100, extra=["x" * 10_000, json.dumps({"input": "embed me"})])
    job = request(tmp_path, backend, source, time_budget=0.0001, concurrency=1)
    first = run_batch(job)
    assert first["state"] == "running" and first["completed"] < 100
    with source.open("a") as handle:
        handle.write("{}\n")
    changed = run_batch(job)
    assert changed["state"] == "failed" and changed["errors"][0]["code"] == "input_changed"
    fresh = request(tmp_path, backend, source, batch_id="batch_other", output=str(tmp_path / "out" / "batch_other"))
    finished = run_batch(fresh)
    assert finished["state"] == "completed"
    errors = [json.loads(line) for line in (tmp_path / "out" / "batch_other" / "errors.jsonl").read_text().splitlines()]
    assert {(error["line"], error["error"]["code"]) for error in errors} == {
        (101, "line_too_long"),
        (103, "unknown_operation"),
    }
    assert finished["completed"] == 101


def test_cancel_flag_stops_a_running_slice(tmp_path: Path) -> None:
    source = write_input(tmp_path / "input.jsonl", 2000)
    with simulator("--ttft", "0.05") as slow:
        job = request(tmp_path, slow, source, concurrency=4)
        folder = Path(job["output"])
        outcome: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: outcome.update(run_batch(job)))
        worker.start()
        time.sleep(1.0)
        began = time.monotonic()
        (folder / "cancel").touch()
        worker.join(10)
        assert not worker.is_alive() and time.monotonic() - began < 2
    assert outcome["state"] == "cancelled" and 0 < outcome["completed"] < 2000
    assert len(lines_of(folder, "results.jsonl")) == outcome["completed"]


async def test_a_slice_runs_as_the_registered_batch_function_on_a_globus_endpoint(tmp_path: Path) -> None:
    import secrets

    from gateway.config import EndpointSettings
    from gateway.dispatch.globus import GlobusDispatcher
    from gateway.federation.registry import Endpoint
    from gateway.streaming.relay import LocalRelay
    from tests.globus_doubles import (
        FUNCTION_IDS,
        GLOBUS_ENDPOINT,
        ComputeService,
        ExecutorFactory,
        simulator_launch,
    )
    from tests.support import stop_model_servers

    node = tmp_path / "node"
    launch = simulator_launch(node)
    ids = {**FUNCTION_IDS, "batch": "aaaaaaaa-0000-4000-8000-000000000003"}
    settings = EndpointSettings.model_validate(
        {
            "cluster": "polaris",
            "framework": "vllm",
            "models": [MODEL],
            "transport": "globus",
            "globus": {"endpoint_id": GLOBUS_ENDPOINT, "function_ids": ids},
            "worker_model_server": launch,
        }
    )
    endpoint = Endpoint.from_settings(settings, "")
    executors = ExecutorFactory()
    dispatcher = GlobusDispatcher(
        relay=LocalRelay(secrets.token_bytes(32)),
        relay_url=None,
        request_timeout=30,
        client_factory=ComputeService,
        executor_factory=executors,
    )
    source = write_input(tmp_path / "input.jsonl", 50)
    job = {
        "batch_id": "batch_globus",
        "input": str(source),
        "output": str(tmp_path / "out" / "batch_globus"),
        "allowed_roots": [str(tmp_path)],
        "model": MODEL,
        "backend_model": MODEL,
        "endpoint": "/v1/chat/completions",
        "max_lines": 100,
        "max_line_bytes": 4096,
        "concurrency": 8,
        "time_budget": 30,
        "timeout": 30,
        "model_server": launch,
    }
    await dispatcher.start()
    try:
        result = await dispatcher.run(endpoint, "batch", job, 60)
    finally:
        await dispatcher.close()
        stop_model_servers(node)
    assert result["state"] == "completed" and result["completed"] == 50
    assert executors.made[0].submitted[0][0] == ids["batch"]
    assert sorted(lines_of(tmp_path / "out" / "batch_globus", "results.jsonl")) == list(range(1, 51))
