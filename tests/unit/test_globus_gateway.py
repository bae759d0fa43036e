"""The gateway with a ``globus`` endpoint, used the way a scientist would, through the official ``openai`` client.

The Globus Compute service is replaced at the SDK boundary (``tests.globus_doubles``); everything else is real:
the gateway under uvicorn, the ``inference`` compute function, the model server it starts, and the relay that
carries a streamed answer from the worker back to the client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.dispatch.globus import GlobusDispatcher
from tests.globus_doubles import (
    FUNCTION_IDS,
    GLOBUS_ENDPOINT,
    MODEL,
    ComputeService,
    ExecutorFactory,
    simulator_launch,
    stop_model_servers,
)

T = TypeVar("T")
TOKEN = "globus-gateway-test-token"
QUESTION = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]


class RunningGateway:
    """The gateway app under uvicorn in a background thread, its globus dispatcher on the SDK doubles."""

    def __init__(self, config: GatewayConfig, sock: socket.socket, service: ComputeService) -> None:
        self.socket = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(config)
        self.runtime = runtime = app.state.runtime
        self.executors = ExecutorFactory()
        runtime.dispatchers["globus"] = GlobusDispatcher(
            relay=runtime.relay,
            relay_url=config.relay.url,
            request_timeout=config.server.request_timeout,
            client_factory=lambda: service,
            executor_factory=self.executors,
        )
        self.server = uvicorn.Server(
            uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="on", access_log=False, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()

    def client(self, route: str = "/resource_server/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}{route}", api_key=TOKEN, max_retries=0, timeout=60)


def once_started(request: Callable[[], T]) -> T:
    """``request``'s answer, asked again while the gateway says the model is being started (503)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return request()
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc.message
            time.sleep(0.5)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("node")
    yield directory
    stop_model_servers(directory)


@pytest.fixture(scope="module")
def service() -> ComputeService:
    return ComputeService()


@pytest.fixture(scope="module")
def gateway(
    node_dir: Path, service: ComputeService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = GatewayConfig.model_validate(
        {
            "server": {"state_dir": str(tmp_path_factory.mktemp("gateway-state")), "request_timeout": 60},
            "auth": {"providers": ["dev"], "dev": {"token_env": "GLOBUS_GATEWAY_TEST_TOKEN"}},
            "relay": {"url": f"http://127.0.0.1:{sock.getsockname()[1]}"},
            "federation": {"status_interval": 0.5, "stale_after": 5},
            "endpoints": [
                {
                    "cluster": "polaris",
                    "framework": "vllm",
                    "models": [MODEL],
                    "transport": "globus",
                    "globus": {"endpoint_id": GLOBUS_ENDPOINT, "function_ids": FUNCTION_IDS},
                    "worker_model_server": simulator_launch(node_dir),
                }
            ],
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOBUS_GATEWAY_TEST_TOKEN", TOKEN)
        with RunningGateway(config, sock, service) as running:
            yield running


def test_cold_model_is_started_then_answers_through_globus_compute(gateway: RunningGateway) -> None:
    client = gateway.client()
    with pytest.raises(openai.APIStatusError) as cold:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
    assert cold.value.status_code == 503 and "being started" in cold.value.message

    completion = once_started(lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8))

    assert completion.model == MODEL
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    functions = {function_id for executor in gateway.executors.made for function_id, _ in executor.submitted}
    assert functions == {FUNCTION_IDS["inference"], FUNCTION_IDS["status"]}


def test_streamed_chat_comes_back_through_the_relay(gateway: RunningGateway) -> None:
    client = gateway.client("/resource_server/polaris/vllm/v1")
    chunks = once_started(
        lambda: list(
            client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=12, stream=True, stream_options={"include_usage": True}
            )
        )
    )

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    streamed = [request for _, (request,) in gateway.executors.made[0].submitted if request.get("stream")]
    assert streamed and streamed[-1]["stream"]["url"].startswith(f"{gateway.url}/resource_server/internal/streams/")


def test_responses_messages_and_tokenizer_go_through_globus_compute(gateway: RunningGateway) -> None:
    client = gateway.client()
    with client.responses.stream(model=MODEL, input="Boiling point of water?", max_output_tokens=6) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and final.usage is not None and final.usage.output_tokens == 6
    claude = anthropic.Anthropic(base_url=f"{gateway.url}/resource_server/polaris/vllm", api_key=TOKEN, max_retries=0)
    with claude.messages.stream(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}]) as events:
        assert len("".join(events.text_stream).split()) == 4
    counted: Any = client.post("/tokenize", body={"model": MODEL, "prompt": "water boils"}, cast_to=object)
    assert counted["count"] == 2


def test_offline_globus_endpoint_is_refused_without_waiting(gateway: RunningGateway, service: ComputeService) -> None:
    service.status = {"status": "offline"}
    runtime = gateway.runtime
    submitted = sum(len(executor.submitted) for executor in gateway.executors.made)
    try:
        deadline = time.monotonic() + 30
        while runtime.registry.endpoints[0].availability.state != "offline":
            assert time.monotonic() < deadline, "the tracker did not see the endpoint go offline"
            time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as refused:
            gateway.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        assert refused.value.status_code == 503
        assert time.monotonic() - started < 5
        assert sum(len(executor.submitted) for executor in gateway.executors.made) == submitted
    finally:
        service.status = ComputeService().status
