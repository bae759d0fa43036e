"""What the client sees when a backend misbehaves, and backends of kind ``openai``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, ScriptedBackend, api_url, direct_config, endpoint, gateway

MESSAGES = [{"role": "user", "content": "What is machine learning?"}]
SCRIPTED = [
    "status-400",
    "status-404",
    "status-422",
    "status-429",
    "status-500",
    "status-503",
    "not-json",
    "plain-stream",
    "crlf-stream",
    "cr-stream",
    "fine",
]


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedBackend]:
    with ScriptedBackend() as backend:
        yield backend


@pytest.fixture(scope="module")
def openai_like() -> Iterator[ScriptedBackend]:
    with ScriptedBackend(api_key="sk-test-key") as backend:
        yield backend


@pytest.fixture(scope="module")
def front(
    scripted: ScriptedBackend, openai_like: ScriptedBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    # One endpoint per scripted behaviour, so that the failures of one do not open another's breaker.
    config = direct_config(
        *(endpoint(scripted.base_url, [model], cluster=f"scripted-{model}") for model in SCRIPTED),
        endpoint(
            openai_like.base_url,
            ["openai/gpt-4o-mini"],
            cluster="openai",
            framework="api",
            kind="openai",
            api_key_env="TEST_OPENAI_KEY",
        ),
    )
    with gateway(config, tmp_path_factory.mktemp("backends"), env={"TEST_OPENAI_KEY": "sk-test-key"}) as server:
        yield server


def post(front: ModelServer, model: str, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{api_url(front)}/chat/completions",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"model": model, "messages": MESSAGES, **extra},
        timeout=30,
    )


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_upstream_4xx_reaches_the_client_in_the_same_shape(front: ModelServer, status: int) -> None:
    response = post(front, f"status-{status}")
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"] == f"scripted failure {status}" and error["code"] == f"scripted_{status}"


def test_upstream_429_is_a_rate_limit_error_for_the_sdk(front: ModelServer) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="status-429", messages=MESSAGES)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("status-500", 502, "upstream_error"),
        ("not-json", 502, "bad_gateway"),
        ("status-503", 503, "backend_unavailable"),
    ],
)
def test_upstream_failures_map_to_5xx(front: ModelServer, model: str, status: int, code: str) -> None:
    response = post(front, model)
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_stream_that_is_not_an_event_stream_is_502(front: ModelServer) -> None:
    response = post(front, "plain-stream", stream=True)
    assert response.status_code == 502 and "event stream" in response.json()["error"]["message"]


def test_openai_kind_uses_the_configured_key_and_model_name(front: ModelServer, openai_like: ScriptedBackend) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key=TOKEN)
    response = client.chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert response.model == "openai/gpt-4o-mini"
    headers, body = openai_like.requests[-1]
    assert body["model"] == "gpt-4o-mini"
    assert headers["authorization"] == "Bearer sk-test-key"
    assert TOKEN not in json.dumps(headers)


def test_callers_token_is_never_forwarded(front: ModelServer, scripted: ScriptedBackend) -> None:
    assert post(front, "fine").status_code == 200
    headers, _ = scripted.requests[-1]
    assert "authorization" not in headers


def test_unexpected_failure_is_500_with_request_id_and_no_traceback(tmp_path: Path) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from gateway.api.responses import api_handler

    @api_handler
    async def broken(request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    with TestClient(Starlette(routes=[Route("/x", broken)])) as client:
        response = client.get("/x", headers={"x-request-id": "req-42"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert "req-42" in error["message"] and "secret internal detail" not in response.text
    assert error["type"] == "server_error"


@pytest.mark.parametrize("model", ["crlf-stream", "cr-stream"])
def test_a_stream_with_crlf_or_cr_line_endings_reaches_the_client(front: ModelServer, model: str) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Hello world"
    # The client did not ask for usage: the backend's usage-only chunk was counted and taken out.
    assert all(chunk.choices for chunk in chunks)
    with_usage = client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[arg-type]
    usage = [chunk.usage for chunk in with_usage if chunk.usage]
    assert usage and usage[-1].completion_tokens == 2
