"""The deployment example as an operator runs it: two replicas behind Debian's HAProxy sharing PostgreSQL and Redis,
restarted one after the other while requests and streams flow; none of them fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
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
from tests.support import REPO, TOKEN, forget_redis_keys

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
            forget_redis_keys(REDIS, env["REDIS_PREFIX"])


class Load:
    """Clients sending whole and streamed requests through the load balancer until stopped; what each got."""

    def __init__(self, url: str, whole: int = 2, streamed: int = 2) -> None:
        self.url = url
        self.answered: list[str] = []
        self.failures: list[str] = []
        # Streams that failed after their first event reached the client: a replica lost mid-answer.
        self.cut: list[str] = []
        self._stop = threading.Event()
        targets = [self._whole] * whole + [self._streamed] * streamed
        self._clients = [threading.Thread(target=target) for target in targets]

    def __enter__(self) -> Load:
        for client in self._clients:
            client.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for client in self._clients:
            client.join(timeout=120)

    def _whole(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 5}
        with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as session:
            while not self._stop.is_set():
                try:
                    response = session.post(f"{self.url}/chat/completions", json=body)
                    ok = response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
                    outcome = f"whole {response.status_code} {response.text[:200]}"
                    (self.answered if ok else self.failures).append(outcome)
                except httpx.HTTPError as exc:
                    self.failures.append(f"whole {exc!r}")

    def _streamed(self) -> None:
        # About a second each at 5 ms a token: a replica told to stop is usually in the middle of some.
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me more."}], "max_tokens": 200}
        with httpx.Client(headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as session:
            while not self._stop.is_set():
                lines: list[str] = []
                try:
                    request = {**body, "stream": True}
                    with session.stream("POST", f"{self.url}/chat/completions", json=request) as stream:
                        for line in stream.iter_lines():
                            if line.startswith("data: "):
                                lines.append(line)
                    chunks = [json.loads(line[6:]) for line in lines[:-1]]
                    ok = (
                        stream.status_code == 200
                        and lines[-1:] == ["data: [DONE]"]
                        and chunks[-1]["choices"][0]["finish_reason"] == "length"
                    )
                    outcome = f"stream {stream.status_code} {lines[-2:]}"
                except (httpx.HTTPError, IndexError, KeyError, ValueError) as exc:
                    ok, outcome = False, f"stream {exc!r} after {len(lines)} events"
                (self.answered if ok else self.cut if lines else self.failures).append(outcome)


def test_a_rolling_restart_behind_haproxy_fails_no_request(deployment: tuple[str, dict[str, str]]) -> None:
    url, env = deployment
    with Load(url) as load:
        time.sleep(2)
        before = len(load.answered)
        example("rolling-restart", env)
        time.sleep(2)
    assert not load.failures and not load.cut, (load.failures + load.cut)[:5]
    assert before > 0 and len(load.answered) > before


def test_a_replica_killed_behind_haproxy_fails_only_answers_it_had_begun(
    deployment: tuple[str, dict[str, str]],
) -> None:
    url, env = deployment
    with Load(url) as load:
        time.sleep(2)
        before = len(load.answered)
        os.kill(int((Path(env["RUN_DIR"]) / "r1.pid").read_text()), signal.SIGKILL)
        # Long enough for HAProxy's checks to take r1 out and for requests to flow through r2 alone.
        time.sleep(5)
    assert not load.failures, load.failures[:5]
    assert before > 0 and len(load.answered) > before
