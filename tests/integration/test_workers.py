"""``inference-gateway serve --workers N``: several serving processes on one machine, sharing what must be shared."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from compute_functions.model_server import ModelServer
from compute_functions.processes import group_alive
from gateway.cli import serve_command
from tests.globus_doubles import FUNCTION_IDS, GLOBUS_ENDPOINT
from tests.support import TOKEN, api_url, direct_config, endpoint, simulator

MODEL = "facebook/opt-125m"
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AUTH = {"authorization": f"Bearer {TOKEN}"}


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / f"gateway-{os.urandom(4).hex()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def refused(tmp_path: Path, config: dict[str, Any]) -> str:
    command = [part.replace("{port}", "1") for part in serve_command(write_config(tmp_path, config))]
    done = subprocess.run([*command, "--workers", "2"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "cannot share this configuration" in done.stderr
    return done.stderr


def test_settings_kept_in_one_process_are_refused_with_what_to_set(tmp_path: Path) -> None:
    limited = direct_config(endpoint("http://127.0.0.1:9/v1", [MODEL]))
    limited["limits"] = {"defaults": {"requests_per_second": 5}}
    assert "set limits.redis_url (or INFERENCE_GATEWAY_LIMITS_REDIS_URL)" in refused(tmp_path, limited)
    pushed = direct_config(
        {
            "cluster": "hpc",
            "framework": "vllm",
            "models": [MODEL],
            "transport": "globus",
            "globus": {"endpoint_id": GLOBUS_ENDPOINT, "function_ids": FUNCTION_IDS},
            "worker_model_server": {"command": ["vllm", "serve", "{model}", "--port", "{port}"]},
        }
    )
    assert "set relay.redis_url (or INFERENCE_GATEWAY_RELAY_REDIS_URL)" in refused(tmp_path, pushed)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[ModelServer]:
    with simulator("--tpot", "0.01") as backend:
        # A head bound below the default, so that a process serving with the default would let large heads through.
        config = direct_config(endpoint(backend.base_url, [MODEL]), max_header_bytes=8192)
        config["limits"] = {
            "redis_url": REDIS,
            "redis_prefix": f"test-workers-{os.urandom(4).hex()}:",
            "models": {MODEL: {"total": {"concurrent_requests": 1}}},
        }
        server = ModelServer(
            [*serve_command(write_config(tmp_path, config), log_level="info"), "--workers", "2"],
            health_path="/resource_server/health",
            env={"INFERENCE_GATEWAY_STATE_DIR": str(tmp_path / "state"), "INFERENCE_GATEWAY_DEV_TOKEN": TOKEN},
            log_path=tmp_path / "workers.log",
        )
        server.start(timeout=60)
        try:
            yield server
        finally:
            server.stop()


def serving_processes(parent: int) -> list[int]:
    """The processes uvicorn started for ``parent`` (spawned interpreters; not its resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_two_serving_processes_hold_one_limit_and_one_head_bound_and_stop_together(two_workers: ModelServer) -> None:
    assert two_workers.process is not None
    parent = two_workers.process.pid
    deadline = time.monotonic() + 30
    while len(serving_processes(parent)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(serving_processes(parent)) == 2, two_workers.log_tail()
    url = f"{api_url(two_workers)}/chat/completions"
    question = {"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}]}
    with httpx.Client(headers=AUTH, timeout=30) as session:
        with session.stream("POST", url, json={**question, "max_tokens": 2000, "stream": True}) as stream:
            assert stream.status_code == 200
            chunks = stream.iter_bytes()
            next(chunks)
            # New connections, spread over both processes by the kernel: the one slot is taken for all of them.
            statuses = []
            for _ in range(12):
                statuses.append(
                    httpx.post(url, json={**question, "max_tokens": 1}, headers=AUTH, timeout=30).status_code
                )
            assert statuses == [429] * 12
        assert all(
            httpx.post(url, json={**question, "max_tokens": 1}, headers=AUTH, timeout=30).status_code == 200
            for _ in range(4)
        )
    # Each process bounds request heads as configured (the protocol class reaches them by name, not by value).
    large = {**AUTH, "x-padding": "a" * 12_000}
    for _ in range(12):
        answer = httpx.get(f"{api_url(two_workers)}/models", headers=large, timeout=30)
        assert answer.status_code == 431, answer.text
        assert answer.json()["error"]["code"] == "headers_too_large"
    os.kill(parent, signal.SIGTERM)
    two_workers.process.wait(timeout=30)
    # What the processes started (usage writers, uvicorn's resource tracker) leaves right after them.
    deadline = time.monotonic() + 15
    while group_alive(parent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(parent)
