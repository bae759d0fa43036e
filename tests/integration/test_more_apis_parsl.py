"""The embedded default (``parsl``: a local worker pool runs the compute function, which starts the simulator and
streams through the gateway's relay) answers Responses, Anthropic Messages, rerank, score and the tokenizer, with the
``openai`` and ``anthropic`` clients as users run them.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import embedded_default

MODEL = "facebook/opt-125m"


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelServer, str]]:
    with embedded_default(tmp_path_factory.mktemp("default-apis")) as started:
        yield started


def test_responses_whole_and_streamed(default_gateway: tuple[ModelServer, str]) -> None:
    server, token = default_gateway
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/resource_server/v1", api_key=token)
    whole = client.responses.create(model=MODEL, input="Explain quantum computing", max_output_tokens=6)
    assert len(whole.output_text.split()) == 6 and whole.usage is not None and whole.usage.output_tokens == 6
    with client.responses.stream(model=MODEL, input="Explain quantum computing", max_output_tokens=6) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text


def test_messages_whole_and_streamed(default_gateway: tuple[ModelServer, str]) -> None:
    server, token = default_gateway
    claude = anthropic.Anthropic(base_url=f"http://127.0.0.1:{server.port}/resource_server/local/vllm", api_key=token)
    question: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Explain quantum computing"}]
    whole = claude.messages.create(model=MODEL, max_tokens=5, messages=question)
    assert whole.usage.output_tokens == 5 and whole.stop_reason == "max_tokens"
    with claude.messages.stream(model=MODEL, max_tokens=5, messages=question) as stream:
        text = "".join(stream.text_stream)
    assert text == whole.content[0].text  # type: ignore[union-attr]


def test_rerank_score_and_tokenizer(default_gateway: tuple[ModelServer, str]) -> None:
    server, token = default_gateway
    base = f"http://127.0.0.1:{server.port}/resource_server/v1"
    auth = {"authorization": f"Bearer {token}"}
    reranked = httpx.post(
        f"{base}/rerank", headers=auth, json={"model": MODEL, "query": "q", "documents": ["a", "b"]}, timeout=60
    )
    assert reranked.status_code == 200 and len(reranked.json()["results"]) == 2
    scored = httpx.post(f"{base}/score", headers=auth, json={"model": MODEL, "text_1": "a", "text_2": "b"}, timeout=60)
    assert scored.status_code == 200 and scored.json()["data"][0]["object"] == "score"
    tokens = httpx.post(f"{base}/tokenize", headers=auth, json={"model": MODEL, "prompt": "hello world"}, timeout=60)
    assert tokens.status_code == 200 and tokens.json()["count"] == 2
    text = httpx.post(
        f"{base}/detokenize", headers=auth, json={"model": MODEL, "tokens": tokens.json()["tokens"]}, timeout=60
    )
    assert text.json()["prompt"] == "hello world"
