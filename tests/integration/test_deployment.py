"""The deployment example as an operator runs it: two replicas behind Debian's HAProxy sharing PostgreSQL and Redis,
restarted one after the other while requests and streams flow; none of them fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compute_functions.model_server import free_port
from tests.databases import asyncpg_url, scratch_database
from tests.support import REPO, TOKEN

EXAMPLE = REPO / "examples" / "replicas" / "replicas.sh"
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "facebook/opt-125m"


def example(command: str, env: dict[str, str]) -> None:
    done = subprocess.run(["bash", str(EXAMPLE), command], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        pytest.fail("haproxy is not installed: make haproxy-env (as root) installs it")
    with scratch_database() as url:
        lb = free_port()
        env = {
            **os.environ,
            "PYTHON": sys.executable,
            "RUN_DIR": str(tmp_path / "run"),
            "LB_PORT": str(lb),
            "STATS_PORT": str(free_port()),
            "REPLICA_PORTS": f"{free_port()} {free_port()}",
            "BACKEND_PORT": str(free_port()),
            "INFERENCE_GATEWAY_DATABASE_URL": asyncpg_url(url),
            "REDIS_URL": REDIS,
            "REDIS_PREFIX": f"test-deployment-{os.urandom(4).hex()}:",
            "INFERENCE_GATEWAY_DEV_TOKEN": TOKEN,
        }
        try:
            example("start", env)
            yield f"http://127.0.0.1:{lb}/resource_server/v1", env
        finally:
            example("stop", env)


def test_a_rolling_restart_behind_haproxy_fails_no_request(deployment: tuple[str, dict[str, str]]) -> None:
    url, env = deployment
    stop = threading.Event()
    answered: list[str] = []
    failures: list[str] = []

    def whole() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 5}
        with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as session:
            while not stop.is_set():
                try:
                    response = session.post(f"{url}/chat/completions", json=body)
                    ok = response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
                    (answered if ok else failures).append(f"whole {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(f"whole {exc!r}")

    def streamed() -> None:
        # About a second each at 5 ms a token: a replica told to stop is usually in the middle of some.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me more."}], "max_tokens": 200}
        with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as session:
            while not stop.is_set():
                try:
                    with session.stream("POST", f"{url}/chat/completions", json={**body, "stream": True}) as stream:
                        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
                    chunks = [json.loads(line[6:]) for line in lines[:-1]]
                    ok = (
                        stream.status_code == 200
                        and lines[-1:] == ["data: [DONE]"]
                        and chunks[-1]["choices"][0]["finish_reason"] == "length"
                    )
                    (answered if ok else failures).append(f"stream {stream.status_code} {lines[-2:]}")
                except (httpx.HTTPError, IndexError, KeyError, ValueError) as exc:
                    failures.append(f"stream {exc!r}")

    clients = [threading.Thread(target=target) for target in (whole, whole, streamed, streamed)]
    for client in clients:
        client.start()
    try:
        time.sleep(2)
        before = len(answered)
        example("rolling-restart", env)
        time.sleep(2)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    assert not failures, failures[:5]
    assert before > 0 and len(answered) > before
