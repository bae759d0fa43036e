"""The embedded default, started as a newcomer starts it, answers the usage guide's examples as written."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import REPO, embedded_default

GUIDE_CURLS = [
    """curl -X POST http://127.0.0.1:8000/resource_server/v1/chat/completions \\
-H "Authorization: Bearer $MY_TOKEN" \\
-H "Content-Type: application/json" \\
-d '{
"model": "facebook/opt-125m",
"messages": [
{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}
],
"max_tokens": 150
}'""",
    """curl -X POST http://127.0.0.1:8000/resource_server/local/vllm/v1/chat/completions \\
-H "Authorization: Bearer $MY_TOKEN" \\
-H "Content-Type: application/json" \\
-d '{
"model": "facebook/opt-125m",
"messages": [
{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}
],
"max_tokens": 150
}'""",
    """curl -X POST http://127.0.0.1:8000/resource_server/v1/completions \\
-H "Authorization: Bearer $MY_TOKEN" \\
-H "Content-Type: application/json" \\
-d '{
"model": "facebook/opt-125m",
"prompt": "The future of AI is",
"max_tokens": 100
}'""",
    """curl -X POST http://127.0.0.1:8000/resource_server/v1/chat/completions \\
-H "Authorization: Bearer $MY_TOKEN" \\
-H "Content-Type: application/json" \\
-d '{
"model": "meta-llama/Meta-Llama-3-8B-Instruct",
"messages": [{"role": "user", "content": "Write a story"}],
"max_tokens": 500,
"temperature": 0.7,
"top_p": 0.9,
"stream": false,
"stop": ["\\n\\n"]
}'""",
]


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelServer, str]]:
    with embedded_default(tmp_path_factory.mktemp("default-state")) as started:
        yield started


@pytest.mark.parametrize("command", GUIDE_CURLS, ids=["chat", "cluster-chat", "completions", "advanced"])
def test_usage_guide_curl(default_gateway: tuple[ModelServer, str], command: str) -> None:
    server, token = default_gateway
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    result = subprocess.run(
        ["bash", "-c", command + " --silent --show-error --fail-with-body"],
        capture_output=True,
        text=True,
        env={**os.environ, "MY_TOKEN": token},
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert answer["choices"] and answer["usage"]["completion_tokens"] > 0


def test_usage_guide_python_examples(default_gateway: tuple[ModelServer, str]) -> None:
    server, token = default_gateway
    client = openai.OpenAI(base_url=f"http://localhost:{server.port}/resource_server/v1", api_key=token)
    stream = client.chat.completions.create(
        model="facebook/opt-125m", messages=[{"role": "user", "content": "Explain quantum computing"}], stream=True
    )
    printed = "".join(
        chunk.choices[0].delta.content
        for chunk in stream
        if chunk.choices and chunk.choices[0].delta.content is not None
    )
    assert printed
    response = client.chat.completions.create(
        model="meta-llama/Meta-Llama-3-8B-Instruct",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is machine learning?"},
        ],
        max_tokens=200,
    )
    assert response.choices[0].message.content


def test_the_printed_token_command_works_outside_the_virtual_environment(
    default_gateway: tuple[ModelServer, str],
) -> None:
    server, token = default_gateway
    state = server.env["INFERENCE_GATEWAY_STATE_DIR"]
    log = (Path(state) / "serve.log").read_text()
    (printed,) = [line.strip() for line in log.splitlines() if line.strip().startswith("export MY_TOKEN=")]
    # A new shell: no virtual environment active, so no inference-gateway on the PATH.
    result = subprocess.run(
        ["bash", "-c", f'{printed}; printf %s "$MY_TOKEN"'],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "INFERENCE_GATEWAY_STATE_DIR": state},
        timeout=60,
    )
    assert result.stdout == token, result.stderr


def test_the_simulator_says_what_it_is(default_gateway: tuple[ModelServer, str]) -> None:
    server, token = default_gateway
    client = openai.OpenAI(base_url=f"http://localhost:{server.port}/resource_server/v1", api_key=token)
    models = {model.id: model for model in client.models.list()}
    assert {"facebook/opt-125m", "meta-llama/Meta-Llama-3-8B-Instruct"} <= set(models)
    assert all(model.model_extra and model.model_extra["simulated"] is True for model in models.values())
    answer = client.chat.completions.create(
        model="facebook/opt-125m", messages=[{"role": "user", "content": "Hello"}], max_tokens=3
    )
    assert answer.model_extra and answer.model_extra["simulated"] is True
    state = Path(server.env["INFERENCE_GATEWAY_STATE_DIR"])
    # The local Parsl worker launched it; its log sits with the node's model-server files.
    assert any("simulator" in log.read_text() for log in (state / "servers").glob("*.log"))


def test_readme_commands_are_the_ones_make_runs() -> None:
    first_lines = (REPO / "README.md").read_text().splitlines()[:6]
    assert any(line.startswith("make serve") for line in first_lines)
    assert any(line.startswith("make test") for line in first_lines)
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert shlex.split("serve: install")[0] in makefile
