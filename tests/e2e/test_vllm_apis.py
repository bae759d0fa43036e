"""Responses, Anthropic Messages and the tokenizer through the gateway to a real vLLM on the CPU, with the clients
users run; and rerank, which vLLM does not serve for a generating model, refused as a route the endpoint lacks.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, api_url

from .conftest import VllmServer

AUTH = {"authorization": f"Bearer {TOKEN}"}
QUESTION = "Tell me a short story about a small robot."


@pytest.fixture(scope="module")
def claude(front: ModelServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{front.port}/resource_server", api_key=TOKEN, max_retries=0, timeout=120
    )


def test_responses_whole(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    response = client.responses.create(model=vllm_server.model, input=QUESTION, max_output_tokens=8)
    assert response.object == "response" and response.model == vllm_server.model
    assert response.usage is not None and 0 < response.usage.output_tokens <= 8 and response.usage.input_tokens > 0


def test_responses_streamed(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    with client.responses.stream(model=vllm_server.model, input=QUESTION, max_output_tokens=8) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas)
    assert final.usage is not None and 0 < final.usage.output_tokens <= 8


def test_messages_whole(claude: anthropic.Anthropic, vllm_server: VllmServer) -> None:
    message = claude.messages.create(
        model=vllm_server.model, max_tokens=8, messages=[{"role": "user", "content": QUESTION}]
    )
    assert message.type == "message" and message.role == "assistant"
    assert 0 < message.usage.output_tokens <= 8 and message.usage.input_tokens > 0


def test_messages_streamed(claude: anthropic.Anthropic, vllm_server: VllmServer) -> None:
    with claude.messages.stream(
        model=vllm_server.model, max_tokens=8, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(block.text for block in final.content if block.type == "text") == text
    assert 0 < final.usage.output_tokens <= 8


def test_messages_count_tokens(claude: anthropic.Anthropic, vllm_server: VllmServer) -> None:
    counted = claude.messages.count_tokens(model=vllm_server.model, messages=[{"role": "user", "content": QUESTION}])
    assert counted.input_tokens > 0


def test_messages_error_from_vllm_in_anthropics_shape(front: ModelServer, vllm_server: VllmServer) -> None:
    answer = httpx.post(
        f"{api_url(front)}/messages",
        headers=AUTH,
        json={"model": vllm_server.model, "max_tokens": 5000, "messages": [{"role": "user", "content": QUESTION}]},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "invalid_request_error"


def test_tokenize_and_detokenize(front: ModelServer, vllm_server: VllmServer) -> None:
    tokens = httpx.post(
        f"{api_url(front)}/tokenize", headers=AUTH, json={"model": vllm_server.model, "prompt": QUESTION}, timeout=60
    )
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["count"] == len(tokens.json()["tokens"]) > 0 and tokens.json()["max_model_len"] == 1024
    text = httpx.post(
        f"{api_url(front)}/detokenize",
        headers=AUTH,
        json={"model": vllm_server.model, "tokens": tokens.json()["tokens"]},
        timeout=60,
    )
    assert text.status_code == 200 and QUESTION in text.json()["prompt"]


def test_rerank_on_a_generating_model_is_a_route_it_lacks(front: ModelServer, vllm_server: VllmServer) -> None:
    answer = httpx.post(
        f"{api_url(front)}/rerank",
        headers=AUTH,
        json={"model": vllm_server.model, "query": "robots", "documents": ["a robot", "a cat"]},
        timeout=60,
    )
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "route_not_served" and "local/vllm" in answer.json()["error"]["message"]
