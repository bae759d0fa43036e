"""The whole path with the ``openai`` client: gateway → Parsl (a real local worker pool) → compute function →
the simulator it launches; whole and streamed, and what happens when parts of the path fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets.exceptions
import websockets.sync.client

from compute_functions.model_server import ModelServer, free_port
from gateway.simulator import command as simulator_command
from tests.support import TOKEN, aborted, api_url, gateway, metric, scrape

MODEL = "facebook/opt-125m"
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
PARSL = {
    "provider": "local",
    "max_workers_per_node": 3,
    "init_blocks": 1,
    "min_blocks": 1,
    "max_blocks": 1,
    # A worker that dies is noticed within a second or two.
    "heartbeat_period": 1,
    "heartbeat_threshold": 5,
}


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parsl")


@pytest.fixture(scope="module")
def simulator_port() -> int:
    return free_port()


def processes() -> Iterator[tuple[int, int, bytes]]:
    """(pid, parent pid, command line) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        yield int(entry.name), int(stat[stat.rfind(")") + 2 :].split()[1]), cmdline


def ours(tmp_module: Path) -> list[int]:
    """Processes of this module's gateway: its worker pool, the watchdogs and servers they started."""
    marker = str(tmp_module).encode()
    return [pid for pid, _, cmdline in processes() if marker in cmdline and b"gateway.cli" not in cmdline]


def sockets_to(port: int) -> set[str]:
    """The inodes of the TCP connections to a local ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    return inodes


def request_servers_talking_to(tmp_module: Path, port: int) -> list[int]:
    """The processes that serve this module's requests (the node's request server) with a connection to ``port``.

    The workers only hand requests over; the request server holds them, so it is what dies with them.
    """
    wanted = {f"socket:[{inode}]" for inode in sockets_to(port)}
    found = []
    for pid, _, cmdline in processes():
        if b"serve_node" not in cmdline or str(tmp_module).encode() not in cmdline:
            continue
        try:
            links = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        except OSError:
            continue
        if links & wanted:
            found.append(pid)
    return found


def eventually(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def front(tmp_module: Path, simulator_port: int) -> Iterator[ModelServer]:
    servers = str(tmp_module / "servers")
    simulator = simulator_command(MODEL, LLAMA, options=("--tpot", "0.002"))
    cannot_start = ["{python}", "-c", "import sys; print('boom: no GPU on this node', flush=True); sys.exit(3)"]
    config = {
        "server": {"request_timeout": 60},
        "auth": {"providers": ["dev"]},
        "federation": {"when_not_hot": "hold", "status_interval": 1, "stale_after": 5},
        "endpoints": [
            {
                "cluster": "local",
                "framework": "parsl",
                "models": [MODEL, LLAMA],
                "transport": "parsl",
                "worker_model_server": {
                    "command": simulator,
                    "port": simulator_port,
                    "state_dir": servers,
                    "startup_timeout": 30,
                },
                "parsl": PARSL,
            },
            # Same cluster and Parsl settings: the same worker pool.
            {
                "cluster": "local",
                "framework": "broken",
                "models": ["broken-model"],
                "transport": "parsl",
                "worker_model_server": {"command": cannot_start, "state_dir": servers, "startup_timeout": 10},
                "parsl": PARSL,
            },
        ],
    }
    with gateway(config, tmp_module) as server:
        yield server
    # The gateway stopped its executor: its workers are gone, and the servers they launched must follow.
    assert eventually(lambda: not port_open(simulator_port)), "the simulator outlived the gateway"
    assert eventually(lambda: not ours(tmp_module)), f"processes left behind: {ours(tmp_module)}"


@pytest.fixture
def client(front: ModelServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0, timeout=60)


def stream_lines(front: ModelServer, body: dict[str, Any]) -> Iterator[str]:
    with httpx.stream(
        "POST",
        f"{api_url(front)}/chat/completions",
        json=body,
        timeout=60,
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status_code == 200, response.read()
        yield from response.iter_lines()


def test_chat_whole(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=150)  # type: ignore[arg-type]
    assert response.choices[0].message.content and response.model == MODEL
    assert response.usage is not None and response.usage.completion_tokens == 150


def test_chat_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=LLAMA,
        messages=QUESTION,
        max_tokens=20,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) == 20
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_completions_and_embeddings(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="The future of AI is", max_tokens=12)
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    streamed = client.completions.create(model=MODEL, prompt="The future of AI is", max_tokens=12, stream=True)
    assert len("".join(chunk.choices[0].text for chunk in streamed if chunk.choices).split()) == 12
    embeddings = client.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert len(embeddings.data) == 2 and embeddings.data[0].embedding


def test_the_request_server_dials_in_and_takes_the_next_requests_down_its_channel(
    front: ModelServer, client: openai.OpenAI, tmp_module: Path
) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]

    def connected() -> bool:
        return any("connected" in log.read_text() for log in (tmp_module / "servers").glob("requests-*.log"))

    assert eventually(connected)
    assert request_servers_talking_to(tmp_module, front.port)
    # Whole and streamed answers alike come back down the channel.
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=7)  # type: ignore[arg-type]
    assert whole.usage is not None and whole.usage.completion_tokens == 7
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=7, stream=True)  # type: ignore[arg-type]
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        == whole.choices[0].message.content
    )


async def test_concurrent_streams_and_whole_answers(front: ModelServer) -> None:
    async with openai.AsyncOpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0) as client:

        async def streamed(max_tokens: int) -> str:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=QUESTION,
                max_tokens=max_tokens,  # type: ignore[arg-type]
                stream=True,
            )
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

        async def whole(max_tokens: int) -> str:
            answer = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens)  # type: ignore[arg-type]
            return answer.choices[0].message.content or ""

        texts = await asyncio.gather(*(streamed(10 + i) for i in range(5)), *(whole(10 + i) for i in range(5)))
    # The simulator's answer depends only on the prompt and length, whichever way it travelled.
    assert texts[:5] == texts[5:]


def test_the_endpoint_reports_hot_once_its_server_runs(front: ModelServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]

    def hot() -> bool:
        listed = httpx.get(
            f"http://127.0.0.1:{front.port}/resource_server/list-endpoints",
            headers={"authorization": f"Bearer {TOKEN}"},
        ).json()["data"]
        return any(entry["id"] == "local/parsl" and entry["state"] == "hot" for entry in listed)

    assert eventually(hot, timeout=10)


def test_a_model_server_that_cannot_start_is_503_with_its_log_for_the_operator(front: ModelServer) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    body = {"model": "broken-model", "messages": QUESTION}
    whole = httpx.post(f"{api_url(front)}/chat/completions", json=body, headers=headers, timeout=60)
    assert whole.status_code == 503 and whole.json()["error"]["code"] == "backend_unavailable"
    streamed = httpx.post(
        f"{api_url(front)}/chat/completions", json={**body, "stream": True}, headers=headers, timeout=60
    )
    assert streamed.status_code == 503
    assert "boom: no GPU on this node" not in whole.text
    assert "boom: no GPU on this node" in front.log_path.read_text()


def test_a_client_that_disconnects_makes_the_worker_cancel_its_upstream_request(
    front: ModelServer, simulator_port: int
) -> None:
    metrics = f"http://127.0.0.1:{simulator_port}/metrics"
    aborted_before = aborted(metrics)
    events = stream_lines(front, {"model": MODEL, "messages": QUESTION, "max_tokens": 5000, "stream": True})
    assert next(line for line in events if line.startswith("data:"))
    events.close()

    def cancelled() -> bool:
        return metric(scrape(metrics), "vllm:num_requests_running") == 0 and aborted(metrics) > aborted_before

    assert eventually(cancelled, timeout=10)


def test_unknown_streams_and_strangers_are_refused(front: ModelServer) -> None:
    url = f"http://127.0.0.1:{front.port}/resource_server/internal/streams/not-a-stream"
    assert httpx.post(url, content=b"data: x\n\n", headers={"authorization": "Bearer 1.forged"}).status_code == 404
    assert httpx.post(url, content=b"data: x\n\n").status_code == 401
    # Nodes dial in only with a channel token the gateway signed.
    channel = f"ws://127.0.0.1:{front.port}/resource_server/internal/nodes/not-a-channel"
    for headers in ({}, {"authorization": "Bearer 1.forged"}):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(channel, additional_headers=headers).close()
        assert refused.value.response.status_code == 403


def kill_request_server(tmp_module: Path, simulator_port: int) -> None:
    servers = request_servers_talking_to(tmp_module, simulator_port)
    assert servers, "no request server talks to the model server"
    for pid in servers:
        os.kill(pid, signal.SIGKILL)


def test_a_request_server_killed_mid_stream_ends_the_stream_with_an_error(
    front: ModelServer, client: openai.OpenAI, tmp_module: Path, simulator_port: int
) -> None:
    events = stream_lines(front, {"model": MODEL, "messages": QUESTION, "max_tokens": 5000, "stream": True})
    assert next(line for line in events if line.startswith("data:"))
    kill_request_server(tmp_module, simulator_port)
    killed = time.monotonic()
    data = [line.removeprefix("data: ") for line in events if line.startswith("data:")]
    assert time.monotonic() - killed < 10
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and "worker" in error["message"]
    # The next request starts a new request server, which starts the model server again.
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
    assert response.usage is not None and response.usage.completion_tokens == 3


def test_a_request_server_killed_during_a_whole_answer_is_a_502(
    front: ModelServer, tmp_module: Path, simulator_port: int
) -> None:
    outcome: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        outcome["response"] = httpx.post(
            f"{api_url(front)}/chat/completions",
            timeout=60,
            headers={"authorization": f"Bearer {TOKEN}"},
            json={"model": MODEL, "messages": QUESTION, "max_tokens": 5000},
        )
        outcome["seconds"] = time.monotonic() - started

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1.0)
    kill_request_server(tmp_module, simulator_port)
    asking.join(30)
    response = outcome["response"]
    assert response.status_code == 502 and "worker" in response.json()["error"]["message"]
    assert outcome["seconds"] < 10


def test_the_first_block_starts_with_the_gateway_not_at_parsls_first_scaling_tick(tmp_path: Path) -> None:
    # Parsl's strategy launches a provider's initial blocks at its first tick after the executor started, a whole
    # strategy_period later; the gateway launches them itself, so the first answer does not wait for that tick.
    simulator = simulator_command(MODEL, options=("--tpot", "0.002"))
    config = {
        "auth": {"providers": ["dev"]},
        "federation": {"when_not_hot": "hold"},
        "endpoints": [
            {
                "cluster": "local",
                "framework": "parsl",
                "models": [MODEL],
                "transport": "parsl",
                "worker_model_server": {"command": simulator, "state_dir": str(tmp_path / "servers")},
                "parsl": {**PARSL, "strategy_period": 300},
            }
        ],
    }
    with gateway(config, tmp_path) as server:
        started = time.monotonic()
        client = openai.OpenAI(base_url=api_url(server), api_key=TOKEN, max_retries=0, timeout=60)
        response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
        assert response.usage is not None and response.usage.completion_tokens == 3
        assert time.monotonic() - started < 60
