"""The usage guide's requests through a real gateway process in front of a real simulator process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer, free_port
from tests.support import REPO, TOKEN, api_url, direct_config, endpoint, gateway, metric, scrape, simulator

MODEL = "facebook/opt-125m"
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--tpot", "0.001", models=(MODEL, LLAMA)) as server:
        yield server


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("front-door")


@pytest.fixture(scope="module")
def front(backend: ModelServer, tmp_module: Path) -> Iterator[ModelServer]:
    config = direct_config(
        endpoint(backend.base_url, [MODEL, LLAMA]),
        endpoint(backend.base_url, ["restricted-model"], cluster="secure", allowed_groups=["not-your-group"]),
        endpoint(f"http://127.0.0.1:{free_port()}/v1", ["offline-model"], cluster="dark"),
        max_body_bytes=64 * 1024,
    )
    with gateway(config, tmp_module) as server:
        yield server


@pytest.fixture
def client(front: ModelServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)


@pytest.fixture
def http(front: ModelServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"http://127.0.0.1:{front.port}", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
    ) as session:
        yield session


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code", "param"}, body
    return dict(body["error"])


# --- the usage guide's requests --------------------------------------------------------------------------------


def test_chat_completion_whole(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=150)  # type: ignore[arg-type]
    assert response.choices[0].message.content
    assert response.model == MODEL
    assert response.usage is not None and response.usage.completion_tokens == 150


def test_chat_with_system_prompt_and_advanced_parameters(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=LLAMA,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a story"},
        ],
        max_tokens=500,
        temperature=0.7,
        top_p=0.9,
        stream=False,
        stop=["\n\n"],
    )
    assert response.choices[0].finish_reason in {"stop", "length"}


def test_cluster_route(front: ModelServer) -> None:
    cluster = openai.OpenAI(base_url=f"http://127.0.0.1:{front.port}/resource_server/local/vllm/v1", api_key=TOKEN)
    response = cluster.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
    assert response.usage is not None and response.usage.completion_tokens == 5


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="The future of AI is", max_tokens=100)
    assert response.choices[0].text
    assert response.usage is not None and response.usage.completion_tokens == 100


def test_chat_stream_sync(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Explain quantum computing"}],
        stream=True,
        max_tokens=20,
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) == 20


def test_stream_usage_kept_when_asked(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, stream=True, max_tokens=7, stream_options={"include_usage": True}
    )  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="The future of AI is", max_tokens=12, stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert len(text.split()) == 12


async def test_async_client_whole_and_streamed(front: ModelServer) -> None:
    client = openai.AsyncOpenAI(base_url=api_url(front), api_key=TOKEN)
    whole, stream = await asyncio.gather(
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8),  # type: ignore[arg-type]
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, stream=True),  # type: ignore[arg-type]
    )
    pieces = [
        chunk.choices[0].delta.content async for chunk in stream if chunk.choices and chunk.choices[0].delta.content
    ]
    assert whole.choices[0].message.content == "".join(pieces)
    await client.close()


def test_embeddings(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert len(response.data) == 2 and len(response.data[0].embedding) > 0


def test_models_lists_only_what_the_caller_may_use(client: openai.OpenAI) -> None:
    names = {model.id for model in client.models.list()}
    assert {MODEL, LLAMA, "offline-model"} <= names
    assert "restricted-model" not in names


def test_a_simulator_behind_a_base_url_is_marked_once_its_model_list_is_read(http: httpx.Client) -> None:
    # The gateway learns it from the backend's /v1/models, which the availability tracker reads at start and then
    # every status interval.
    deadline = time.monotonic() + 30
    while True:
        models = {model["id"]: model for model in http.get("/resource_server/v1/models").json()["data"]}
        if models[MODEL]["simulated"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert models[MODEL]["simulated"] is True and models["offline-model"]["simulated"] is False
    endpoints = {item["id"]: item for item in http.get("/resource_server/list-endpoints").json()["data"]}
    assert endpoints["local/vllm"]["simulated"] is True


def test_list_endpoints_and_health(http: httpx.Client) -> None:
    listed = http.get("/resource_server/list-endpoints").json()["data"]
    assert {entry["id"] for entry in listed} == {"local/vllm", "dark/vllm"}
    assert listed[0]["route"] == "/resource_server/local/vllm/v1"
    assert httpx.get(f"{http.base_url}/resource_server/health").json()["status"] == "ok"


def test_other_fields_pass_through_unchanged(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=4,
        seed=7,
        presence_penalty=0.5,
        extra_body={"top_k": 5, "ignore_eos": True},
    )  # type: ignore[arg-type]
    assert response.usage is not None and response.usage.completion_tokens == 4


def test_request_id_is_returned(http: httpx.Client) -> None:
    given = http.post(
        "/resource_server/v1/chat/completions",
        headers={"x-request-id": "abc-123"},
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 1},
    )
    assert given.headers["x-request-id"] == "abc-123"
    made = http.post("/resource_server/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert len(made.headers["x-request-id"]) >= 16


# --- every error row -------------------------------------------------------------------------------------------

BAD_BODIES = [
    ({"messages": QUESTION}, "model"),
    ({"model": 5, "messages": QUESTION}, "model"),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": ["hi"]}, "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": MODEL, "messages": QUESTION, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": True}, "max_tokens"),
    ({"model": MODEL, "messages": QUESTION, "temperature": 2.5}, "temperature"),
    ({"model": MODEL, "messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "messages": QUESTION, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": QUESTION, "top_p": 1.1}, "top_p"),
    ({"model": MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "messages": QUESTION, "stop": 3}, "stop"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
def test_bad_parameters_are_400(http: httpx.Client, body: dict[str, object], param: str) -> None:
    response = http.post("/resource_server/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/resource_server/v1/completions", {"model": MODEL}, "prompt"),
        ("/resource_server/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, "prompt"),
        ("/resource_server/v1/embeddings", {"model": MODEL}, "input"),
        ("/resource_server/v1/embeddings", {"model": MODEL, "input": ""}, "input"),
        ("/resource_server/v1/embeddings", {"model": MODEL, "input": "x", "stream": True}, "stream"),
    ],
)
def test_bad_parameters_on_other_routes(http: httpx.Client, path: str, body: dict[str, object], param: str) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 400 and error_of(response)["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe"])
def test_invalid_json_is_400(http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/resource_server/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
def test_missing_or_wrong_token_is_401(front: ModelServer, header: str | None) -> None:
    headers = {"authorization": header} if header else {}
    response = httpx.post(
        f"{api_url(front)}/chat/completions", headers=headers, json={"model": MODEL, "messages": QUESTION}
    )
    assert response.status_code == 401
    error = error_of(response)
    assert error["type"] == "authentication_error"
    assert "wrong-token" not in response.text


def test_an_empty_token_is_named_as_such(front: ModelServer) -> None:
    # What `-H "Authorization: Bearer $MY_TOKEN"` sends when MY_TOKEN is empty (the openai SDK refuses an empty key).
    result = subprocess.run(
        ["curl", "--silent", "-H", "Authorization: Bearer ", f"{api_url(front)}/models"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "empty_token" and "$MY_TOKEN" in error["message"] and "empty" in error["message"]


def test_openai_client_sees_401_as_authentication_error(front: ModelServer) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=QUESTION)  # type: ignore[arg-type]


def test_endpoint_the_caller_may_not_use_is_403(http: httpx.Client) -> None:
    response = http.post(
        "/resource_server/secure/vllm/v1/chat/completions", json={"model": "restricted-model", "messages": QUESTION}
    )
    assert response.status_code == 403 and error_of(response)["type"] == "permission_error"


@pytest.mark.parametrize(
    ("path", "model", "code"),
    [
        ("/resource_server/v1/chat/completions", "no/such-model", "model_not_found"),
        ("/resource_server/nowhere/vllm/v1/chat/completions", MODEL, "cluster_not_found"),
        ("/resource_server/local/sglang/v1/chat/completions", MODEL, "framework_not_found"),
        ("/resource_server/local/vllm/v1/chat/completions", "no/such-model", "model_not_found"),
        ("/resource_server/v2/chat/completions", MODEL, "route_not_found"),
    ],
)
def test_unknown_model_cluster_framework_or_route_is_404(http: httpx.Client, path: str, model: str, code: str) -> None:
    response = http.post(path, json={"model": model, "messages": QUESTION})
    assert response.status_code == 404 and error_of(response)["code"] == code


def test_openai_client_sees_unknown_model_as_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no/such-model", messages=QUESTION)  # type: ignore[arg-type]
    assert raised.value.code == "model_not_found"


def test_wrong_method_is_405(http: httpx.Client) -> None:
    response = http.get("/resource_server/v1/chat/completions")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert http.post("/resource_server/v1/chat/completions", json=big).status_code == 413

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "facebook/opt-125m", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'

    response = http.post("/resource_server/v1/chat/completions", content=chunked())
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_backend_offline_is_503(http: httpx.Client) -> None:
    response = http.post("/resource_server/v1/chat/completions", json={"model": "offline-model", "messages": QUESTION})
    assert response.status_code == 503
    assert error_of(response)["code"] == "backend_unavailable"
    assert response.headers["retry-after"]


def test_gateway_keeps_serving_after_errors(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3)  # type: ignore[arg-type]
    assert response.usage is not None and response.usage.completion_tokens == 3


# --- faults ----------------------------------------------------------------------------------------------------


def test_failover_to_another_endpoint_when_one_is_down(tmp_path: Path, backend: ModelServer) -> None:
    dead = endpoint(f"http://127.0.0.1:{free_port()}/v1", cluster="first")
    alive = endpoint(backend.base_url, cluster="second")
    with gateway(direct_config(dead, alive), tmp_path) as server:
        client = openai.OpenAI(base_url=api_url(server), api_key=TOKEN, max_retries=0)
        for stream in (False, True):
            answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, stream=stream)  # type: ignore[call-overload]
            assert answer is not None


def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    with (
        simulator("--ttft", "3") as slow,
        gateway(direct_config(endpoint(slow.base_url), request_timeout=0.5), tmp_path) as server,
    ):
        response = httpx.post(
            f"{api_url(server)}/chat/completions",
            headers={"authorization": f"Bearer {TOKEN}"},
            json={"model": MODEL, "messages": QUESTION},
            timeout=30,
        )
    assert response.status_code == 504 and error_of(response)["code"] == "upstream_timeout"


def _stream_lines(server: ModelServer, max_tokens: int) -> httpx.Response:
    client = httpx.Client(timeout=30)
    request = client.build_request(
        "POST",
        f"{api_url(server)}/chat/completions",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"model": MODEL, "messages": QUESTION, "max_tokens": max_tokens, "stream": True},
    )
    return client.send(request, stream=True)


def test_backend_killed_mid_stream_gives_in_band_error(tmp_path: Path, backend: ModelServer) -> None:
    with simulator("--tpot", "0.05") as doomed:
        other = endpoint(backend.base_url, ["other"], cluster="other", aliases={"other": MODEL})
        config = direct_config(endpoint(doomed.base_url), other)
        with gateway(config, tmp_path) as server:
            response = _stream_lines(server, 400)
            assert response.status_code == 200
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        os.killpg(doomed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "bad_gateway" and "broken off" in error["message"]
            assert 5 <= len(events) < 400
            client = openai.OpenAI(base_url=api_url(server), api_key=TOKEN, max_retries=0)
            assert client.chat.completions.create(model="other", messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]


def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path) -> None:
    with simulator("--tpot", "0.05") as slow, gateway(direct_config(endpoint(slow.base_url)), tmp_path) as server:
        response = _stream_lines(server, 1000)
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(scrape(f"http://127.0.0.1:{slow.port}/metrics"), "vllm:num_requests_running") == 1
        response.close()
        deadline = time.monotonic() + 5
        while metric(scrape(f"http://127.0.0.1:{slow.port}/metrics"), "vllm:num_requests_running") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert metric(scrape(f"http://127.0.0.1:{slow.port}/metrics"), "vllm:num_requests_running") == 0


# --- the command line ------------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        timeout=60,
    )


def test_check_config_accepts_the_embedded_default() -> None:
    result = _cli("check-config", "endpoint_configs/local.yaml")
    assert result.returncode == 0 and "OK" in result.stdout


def test_check_config_names_the_bad_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "endpoints:\n  - cluster: local\n    framework: vllm\n    models: [m]\n"
        "    base_url: http://127.0.0.1:1/v1\n    transport: carrier-pigeon\n"
    )
    result = _cli("check-config", str(bad))
    assert result.returncode == 2
    assert "line 6" in result.stderr and "endpoints.0.transport" in result.stderr


def test_serve_on_a_port_in_use_says_so_before_starting(tmp_path: Path) -> None:
    import socket

    config = tmp_path / "gateway.yaml"
    config.write_text(
        "endpoints:\n  - {cluster: local, framework: vllm, models: [m], base_url: 'http://127.0.0.1:9/v1'}\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli(
            "serve", "--port", str(port), "--config", str(config), env={"INFERENCE_GATEWAY_STATE_DIR": str(tmp_path)}
        )
    assert result.returncode == 1, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use." in result.stderr
    assert "startup complete" not in result.stderr and "Dev auth is on" not in result.stderr


def test_dev_token_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    env = {"INFERENCE_GATEWAY_STATE_DIR": str(tmp_path), "INFERENCE_GATEWAY_DEV_TOKEN": ""}
    first = _cli("dev-token", env=env).stdout.strip()
    assert first.startswith("dev-") and _cli("dev-token", env=env).stdout.strip() == first
    assert stat.S_IMODE((tmp_path / "dev-token").stat().st_mode) == 0o600
    assert _cli("dev-token", env={**env, "INFERENCE_GATEWAY_DEV_TOKEN": "from-env"}).stdout.strip() == "from-env"
