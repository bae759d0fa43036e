"""The compute functions on a worker, without a transport: they launch a real simulator and share it.

Each test gets its own server directory, as each node has its own; the test process is the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette

from compute_functions import node
from compute_functions.inference import inference
from compute_functions.processes import alive
from compute_functions.status import status
from gateway.app import ROUTES
from gateway.simulator import command as simulator_command
from gateway.streaming.relay import Ending, LocalRelay, stream_url
from tests.support import REPO, aborted, metric, scrape

MODEL = "facebook/opt-125m"
MESSAGES = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
SIMULATOR = simulator_command(MODEL, options=("--tpot", "0.002"))


def request(
    servers: Path,
    payload: dict[str, Any] | None = None,
    op: str = "chat/completions",
    stream: dict[str, str] | None = None,
    **launch: Any,
) -> dict[str, Any]:
    return {
        "op": op,
        "payload": payload or {"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
        "model_server": {"command": SIMULATOR, "state_dir": str(servers), "startup_timeout": 30, **launch},
        "timeout": 30,
        "stream": stream,
    }


def ready_states(servers: Path) -> list[dict[str, Any]]:
    return node.servers(servers)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def eventually(condition: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Path]:
    """A node's server directory; whatever the test left running there is stopped and must go away."""
    directory = tmp_path / "servers"
    yield directory
    states = [json.loads(path.read_text()) for path in directory.glob("*.json")]
    for state in states:
        if alive(state.get("watchdog")):
            os.kill(state["watchdog"], signal.SIGTERM)
    for state in states:
        assert eventually(lambda state=state: not port_open(state["port"])), f"server left on port {state['port']}"


def test_whole_answers_come_from_one_server_started_on_first_use(servers: Path) -> None:
    started = time.monotonic()
    first = inference(request(servers))
    cold = time.monotonic() - started
    assert first["ok"] and first["response"]["usage"]["completion_tokens"] == 5
    started = time.monotonic()
    completion = inference(
        request(servers, {"model": MODEL, "prompt": "The future of AI is", "max_tokens": 3}, op="completions")
    )
    warm = time.monotonic() - started
    embedding = inference(request(servers, {"model": MODEL, "input": ["a", "b"]}, op="embeddings"))
    assert completion["ok"] and completion["response"]["choices"][0]["text"]
    assert embedding["ok"] and len(embedding["response"]["data"]) == 2
    (state,) = ready_states(servers)
    assert warm < cold and warm < 0.5
    assert "simulator" in Path(state["log"]).read_text()


def test_status_reports_the_served_model_and_its_load(servers: Path) -> None:
    assert inference(request(servers))["ok"]
    report = status({"model_server": {"state_dir": str(servers)}, "scheduler": "none"})
    assert report["ok"] and report["scheduler"] is None and report["jobs"] == []
    (served,) = report["models"]
    assert served["model"] == MODEL and served["healthy"] and served["running"] == 0 and served["waiting"] == 0


def test_worker_processes_share_one_server_and_it_stops_when_they_are_gone(servers: Path) -> None:
    code = (
        "import json, sys; from compute_functions.inference import inference; from compute_functions import node; "
        "result = inference(json.loads(sys.argv[1])); "
        "print(json.dumps({'ok': result['ok'], 'ports': [s['port'] for s in node.servers(sys.argv[2])]}))"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(request(servers)), str(servers)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    answers = [json.loads(worker.communicate(timeout=60)[0]) for worker in workers]
    assert all(answer["ok"] for answer in answers)
    ports = {port for answer in answers for port in answer["ports"]}
    assert len(ports) == 1
    (port,) = ports
    # Every worker process that used it has exited: nothing may outlive them.
    assert eventually(lambda: not port_open(port)), "the server outlived the processes that used it"
    assert eventually(lambda: list(servers.glob("*.json")) == [])


def test_a_server_launched_ahead_is_the_one_the_first_request_finds(servers: Path) -> None:
    # A worker that must start the node's request server launches the model server first, so that both start at
    # once; launching returns at once, and a second launch, or the request, starts nothing more.
    spec = node.LaunchSpec.from_settings(request(servers)["model_server"], MODEL)
    started = time.monotonic()
    node.launch(spec)
    assert time.monotonic() - started < 0.5
    (state_file,) = servers.glob("*.json")
    watchdog = json.loads(state_file.read_text())["watchdog"]
    node.launch(spec)
    assert inference(request(servers))["ok"]
    (state,) = ready_states(servers)
    assert state["watchdog"] == watchdog


def test_an_idle_server_is_stopped(servers: Path) -> None:
    assert inference(request(servers, idle_timeout=1))["ok"]
    (state,) = ready_states(servers)
    assert eventually(lambda: not port_open(state["port"]), timeout=10)
    assert "idle for" in Path(state["log"]).read_text()
    # The next request starts it again.
    assert inference(request(servers, idle_timeout=1))["ok"]


def test_a_server_that_fails_to_start_is_reported_with_its_log(servers: Path) -> None:
    command = ["{python}", "-c", "import sys; print('boom: no GPU on this node', flush=True); sys.exit(3)"]
    result = inference(request(servers, command=command))
    assert not result["ok"]
    error = result["error"]
    assert error["kind"] == "model_start_failed" and error["status"] is None
    assert "boom: no GPU on this node" in error["body"] and "status 3" in error["message"]


def test_a_server_that_never_gets_healthy_is_stopped_whole(servers: Path) -> None:
    marker = f"never-healthy-{secrets.token_hex(4)}"
    # The server's child must go too: the whole process group is stopped.
    code = (
        f"import subprocess, sys, time; print('loading weights', flush=True); "
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{marker}']); time.sleep(600)"
    )
    started = time.monotonic()
    result = inference(request(servers, command=["{python}", "-c", code], startup_timeout=2))
    assert time.monotonic() - started < 20
    assert result["error"]["kind"] == "model_start_failed"
    assert "not healthy after 2 s" in result["error"]["message"] and "loading weights" in result["error"]["body"]
    assert eventually(lambda: not processes_with(marker), timeout=20)


def test_an_error_answer_keeps_its_status_and_body(servers: Path) -> None:
    result = inference(request(servers, {"model": "no-such-model", "messages": MESSAGES}))
    assert result["error"]["kind"] == "upstream" and result["error"]["status"] == 404
    assert "no-such-model" in result["error"]["body"]


async def test_a_streamed_answer_is_pushed_to_the_relay_and_cancelled_with_it(servers: Path) -> None:
    relay = LocalRelay(secrets.token_bytes(32))
    app = Starlette(routes=ROUTES)
    app.state.runtime = SimpleNamespace(relay=relay)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", loop="asyncio")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    relay_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        inbox = await relay.open(60)
        where = {"url": stream_url(relay_url, inbox.stream_id), "token": inbox.token}
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "stream": True}
        whole = asyncio.create_task(asyncio.to_thread(inference, request(servers, payload, stream=where)))
        chunks = []
        while (item := await asyncio.wait_for(inbox.get(), 30)) is not Ending.COMPLETE:
            assert isinstance(item, bytes)
            chunks.append(item)
        result = await whole
        text = b"".join(chunks)
        assert result == {"ok": True, "streamed": text.count(b"\n\n")}
        assert text.endswith(b"data: [DONE]\n\n") and text.count(b'"content"') == 7

        # A long answer whose client goes away: the worker stops writing and lets the model server's request go.
        inbox = await relay.open(60)
        where = {"url": stream_url(relay_url, inbox.stream_id), "token": inbox.token}
        payload = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5000, "stream": True}
        (state,) = ready_states(servers)
        metrics = f"http://127.0.0.1:{state['port']}/metrics"
        aborted_before = aborted(metrics)
        worker = asyncio.create_task(asyncio.to_thread(inference, request(servers, payload, stream=where)))
        assert isinstance(await asyncio.wait_for(inbox.get(), 30), bytes)
        inbox.close()
        result = await asyncio.wait_for(worker, 10)
        assert result["ok"] is False and result["error"]["kind"] == "cancelled"

        def upstream_aborted() -> bool:
            text = scrape(metrics)
            return metric(text, "vllm:num_requests_running") == 0 and aborted(metrics) > aborted_before

        assert await asyncio.to_thread(eventually, upstream_aborted, 10)
    finally:
        server.should_exit = True
        await serving
