"""The simulator answers the routes of vLLM's OpenAI-compatible server beyond chat, completions and embeddings, at
vLLM's paths and with its shapes, so that the gateway can be tried on each against the embedded default."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from compute_functions.model_server import ModelServer
from tests.support import simulator

MODEL = "facebook/opt-125m"


@pytest.fixture(scope="module")
def root() -> Iterator[str]:
    server: ModelServer
    with simulator(models=(MODEL,)) as server:
        yield f"http://{server.host}:{server.port}"


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_at_each_of_vllms_paths(root: str, path: str) -> None:
    answer = httpx.post(f"{root}{path}", json={"model": MODEL, "query": "q", "documents": ["a", "b", "c"], "top_n": 2})
    assert answer.status_code == 200
    body = answer.json()
    assert body["id"].startswith("rerank-") and body["model"] == MODEL and len(body["results"]) == 2
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}


@pytest.mark.parametrize(
    "sides",
    [
        {"text_1": "a", "text_2": ["b", "c"]},
        {"data_1": ["a", "b"], "data_2": ["c", "d"]},
        {"queries": "a", "items": "b"},
    ],
)
def test_score_takes_vllms_spellings(root: str, sides: dict[str, object]) -> None:
    for path in ("/score", "/v1/score"):
        answer = httpx.post(f"{root}{path}", json={"model": MODEL, **sides})
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "list" and answer.json()["data"][0]["object"] == "score"


def test_score_refuses_unequal_sides(root: str) -> None:
    answer = httpx.post(f"{root}/score", json={"model": MODEL, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == 400


def test_tokenize_chat_messages_and_token_strings(root: str) -> None:
    answer = httpx.post(
        f"{root}/tokenize",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "return_token_strs": True},
    )
    assert answer.json()["count"] == 2 and answer.json()["token_strs"] == ["hello", "there"]
    unknown = httpx.post(f"{root}/detokenize", json={"model": MODEL, "tokens": [12345]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tokens"


def test_messages_errors_in_anthropics_shape_as_vllm_gives_them(root: str) -> None:
    missing = httpx.post(f"{root}/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and missing.json()["type"] == "error"
    assert missing.json()["error"]["type"] == "BadRequestError"
    unknown = httpx.post(f"{root}/v1/messages", json={"model": "nope", "max_tokens": 3, "messages": []})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"


def test_responses_whole_answer_has_vllms_fields(root: str) -> None:
    answer = httpx.post(f"{root}/v1/responses", json={"model": MODEL, "input": "a b c", "max_output_tokens": 3})
    body = answer.json()
    assert body["id"].startswith("resp_") and body["object"] == "response"
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["type"] == "output_text"
    assert body["usage"]["input_tokens"] == 3 and body["usage"]["output_tokens"] == 3 and body["simulated"] is True
