"""A real vLLM on the CPU, launched by the compute function on a local Parsl worker, behind the gateway.

Nothing starts vLLM here but the ``inference`` compute function, from the endpoint's ``worker_model_server``
command: the same path that starts vLLM on a GPU node of a cluster. The first request waits for it (about a minute).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, api_url, gateway, metric, scrape

from .conftest import SERVED_MODEL, _ensure_environment, _free_port, _group_members, _model_dir, _server_env
from .test_vllm_direct import (
    EXACT,
    MESSAGES,
    PROMPT,
    check_chat,
    check_chat_stream,
    check_completion,
    check_completion_stream,
)

pytestmark = pytest.mark.e2e

WORKERS = 4
LONG_TOKENS, LONG_SEQUENCES = 1000, 16


class Launched:
    """The gateway, and the vLLM its worker launched (known once the first request brought it up)."""

    def __init__(self, front: ModelServer, port: int, servers: Path) -> None:
        self.front = front
        self.port = port
        self.servers = servers

    def state(self) -> dict[str, object]:
        (state_file,) = self.servers.glob("*.json")
        state: dict[str, object] = json.loads(state_file.read_text())
        return state


def worker_env(venv: Path) -> dict[str, str]:
    """What the model server's environment changes against the worker's (the gateway's) own."""
    wanted = _server_env(venv)
    env = {name: value for name, value in wanted.items() if os.environ.get(name) != value}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = ""
    return env


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    workdir = tmp_path_factory.mktemp("vllm-parsl")
    python = _ensure_environment(workdir / "build.log")
    port = _free_port("127.0.0.1")
    servers = workdir / "servers"
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(_model_dir()),
        "--served-model-name",
        "{model}",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "1024",
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--enforce-eager",
    ]
    config = {
        "server": {"request_timeout": 300},
        "auth": {"providers": ["dev"]},
        "federation": {"when_not_hot": "hold"},
        "endpoints": [
            {
                "cluster": "local",
                "framework": "vllm",
                "models": [SERVED_MODEL],
                "transport": "parsl",
                "worker_model_server": {
                    "command": command,
                    "port": port,
                    "env": worker_env(python.parent.parent),
                    "startup_timeout": float(os.environ.get("INFERENCE_GATEWAY_VLLM_START_TIMEOUT", "300")),
                    "state_dir": str(servers),
                },
                "parsl": {"provider": "local", "max_workers_per_node": WORKERS, "init_blocks": 1, "min_blocks": 1},
            }
        ],
    }
    group = None
    with gateway(config, workdir) as front:
        launched = Launched(front, port, servers)
        yield launched
        if list(servers.glob("*.json")):
            group = launched.state().get("server")
    # The gateway stopped its workers; the vLLM they launched, engine processes included, must follow.
    deadline = time.monotonic() + 60
    while isinstance(group, int) and _group_members(group) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not (isinstance(group, int) and _group_members(group)), "vLLM's processes outlived the gateway"


@pytest.fixture(scope="module")
def client(launched: Launched) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=api_url(launched.front), api_key=TOKEN, max_retries=0, timeout=600) as client:
        yield client


def test_the_first_request_launches_vllm_and_gets_a_whole_answer(client: openai.OpenAI, launched: Launched) -> None:
    answer = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body=EXACT,  # type: ignore[arg-type]
    )
    check_chat(answer, SERVED_MODEL, 12)
    state = launched.state()
    assert state["status"] == "ready" and state["port"] == launched.port
    assert "vllm" in Path(str(state["log"])).read_text().lower()


def test_chat_streamed_through_the_relay(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    with stream:
        check_chat_stream(list(stream), SERVED_MODEL, 10)


def test_completions_whole_and_streamed(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=9, temperature=0, extra_body=EXACT)
    check_completion(answer, SERVED_MODEL, 9)
    stream = client.completions.create(
        model=SERVED_MODEL,
        prompt=PROMPT,
        max_tokens=7,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    with stream:
        check_completion_stream(list(stream), SERVED_MODEL, 7)


def test_vllms_own_400_comes_back_in_the_gateway_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED_MODEL, prompt=PROMPT, max_tokens=5000)


def _abandon_a_long_stream(launched: Launched) -> float:
    """Open a long stream, leave after its first event, wait for vLLM to go idle; the tokens vLLM generated."""
    metrics = f"http://127.0.0.1:{launched.port}/metrics"
    generated_before = metric(scrape(metrics), "vllm:generation_tokens_total")
    # Sixteen sequences of 1000 tokens (vLLM runs with a context of 1024): the tiny model on the CPU can generate
    # thousands of tokens before the first event has travelled vLLM -> worker -> relay -> gateway -> client, when
    # vLLM's threads hold both cores, and the abort has the same way back; a short request would leave nothing to
    # abort.
    body = {
        "model": SERVED_MODEL,
        "prompt": PROMPT,
        "max_tokens": LONG_TOKENS,
        "n": LONG_SEQUENCES,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST",
        f"{api_url(launched.front)}/completions",
        json=body,
        timeout=300,
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 60
    while metric(scrape(metrics), "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(scrape(metrics), "vllm:num_requests_running") == 0
    return metric(scrape(metrics), "vllm:generation_tokens_total") - generated_before


def test_a_client_that_goes_away_makes_vllm_abort_the_request(launched: Launched, client: openai.OpenAI) -> None:
    # A short stream of as many sequences on every worker first: a worker's first stream, and vLLM's first batch of
    # that size, start slowly while vLLM on the CPU takes both cores, and meanwhile the tiny model can generate all
    # its tokens, which would leave nothing to abort.
    def short_stream() -> None:
        with client.completions.create(
            model=SERVED_MODEL, prompt=PROMPT, max_tokens=2, n=LONG_SEQUENCES, stream=True
        ) as stream:
            list(stream)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda _: short_stream(), range(WORKERS)))
    # vLLM does not count a client's abort among its finished requests; but with ignore_eos only an abort ends the
    # request before all its tokens. The tiny model is fast enough to win that race now and then on a busy machine,
    # so the scenario gets three tries; every try must still leave vLLM idle.
    generated = [_abandon_a_long_stream(launched) for _ in range(3)]
    assert min(generated) < LONG_TOKENS * LONG_SEQUENCES, generated
