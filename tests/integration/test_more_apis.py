"""Responses, Anthropic Messages, rerank, score and the tokenizer through the gateway (``direct`` to the simulator),
with the clients users run: the ``openai`` SDK's ``responses``, the ``anthropic`` SDK's ``messages``, and plain HTTP.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, api_url, direct_config, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FAST_WRITES = {"flush_interval": 0.1, "retry_interval": 0.3, "timeout": 3}


class RoutelessBackend:
    """Stands in for a model server without the gateway's newer routes, as vLLM serving a model whose task lacks
    them: it lists ``models`` at ``/v1/models`` and answers every POST with FastAPI's 404 for an unknown path.
    (The real vLLM is in the end-to-end tier.)"""

    def __init__(self, models: tuple[str, ...] = ("routeless",)) -> None:
        listed = json.dumps({"object": "list", "data": [{"id": model, "object": "model"} for model in models]})

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, listed.encode())
                else:
                    self._send(404, b'{"detail":"Not Found"}')

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self._send(404, b'{"detail":"Not Found"}')

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RoutelessBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("more-apis")


@pytest.fixture(scope="module")
def front(home: Path) -> Iterator[ModelServer]:
    with simulator(models=(MODEL, "BAAI/bge-reranker-base")) as backend, RoutelessBackend() as routeless:
        config = direct_config(
            endpoint(backend.base_url, [MODEL, "BAAI/bge-reranker-base"]),
            endpoint(backend.base_url, ["chat-only"], cluster="narrow", apis=["chat/completions"]),
            endpoint(routeless.base_url, ["routeless"], cluster="bare"),
        )
        config["database"] = FAST_WRITES
        config["request_bounds"] = {"models": {MODEL: {"max_tokens": 64}}}
        with gateway(config, home) as server:
            yield server


@pytest.fixture
def client(front: ModelServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)


@pytest.fixture
def claude(front: ModelServer) -> anthropic.Anthropic:
    # The anthropic SDK adds /v1/messages to its base URL, and sends its key as x-api-key.
    return anthropic.Anthropic(base_url=f"http://{front.host}:{front.port}/resource_server", api_key=TOKEN)


def post(front: ModelServer, route: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{api_url(front)}/{route}", headers={**AUTH, **headers}, json=body, timeout=30)


def usage_rows(home: Path, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The usage log's rows of ``ids``, once the usage writer has put them all in."""
    deadline = time.monotonic() + 30
    while True:
        rows: dict[str, dict[str, Any]] = {}
        if (home / "state" / "gateway.db").exists():
            with sqlite3.connect(home / "state" / "gateway.db") as connection:
                connection.row_factory = sqlite3.Row
                # The usage writer makes the table with its first rows.
                with contextlib.suppress(sqlite3.OperationalError):
                    rows = {row["request_id"]: dict(row) for row in connection.execute("SELECT * FROM usage_log")}
        if ids <= rows.keys() or time.monotonic() > deadline:
            assert ids <= rows.keys(), f"usage rows missing: {sorted(ids - rows.keys())}"
            return {rid: rows[rid] for rid in ids}
        time.sleep(0.1)


# --- OpenAI's Responses -------------------------------------------------------------------------------------------


def test_responses_whole_through_the_openai_client(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Explain Globus Compute briefly.", max_output_tokens=7)
    assert response.object == "response" and response.model == MODEL
    assert response.output_text and len(response.output_text.split()) == 7
    assert response.usage is not None and response.usage.output_tokens == 7
    assert response.usage.input_tokens == 4


def test_responses_streamed_with_its_own_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=5, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == 5
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage.output_tokens == 5


def test_responses_stream_helper_on_the_cluster_route(front: ModelServer) -> None:
    cluster = openai.OpenAI(
        base_url=f"http://{front.host}:{front.port}/resource_server/local/vllm/v1", api_key=TOKEN, max_retries=0
    )
    with cluster.responses.stream(model=MODEL, input=[{"role": "user", "content": "Hi there"}]) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and final.usage is not None and final.usage.input_tokens == 2


def test_responses_checks_its_token_limit_and_stream(client: openai.OpenAI, front: ModelServer) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="x", max_output_tokens=0)
    assert refused.value.body["param"] == "max_output_tokens"  # type: ignore[index]
    answer = post(front, "responses", {"model": MODEL, "input": "x", "stream": "yes"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no/such-model", input="x")


# --- Anthropic's Messages -----------------------------------------------------------------------------------------


def test_messages_whole_through_the_anthropic_client(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Explain Globus Compute."}]
    )
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.content[0].type == "text" and len(message.content[0].text.split()) == 6
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 6)


def test_messages_streamed_with_anthropics_events(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=MODEL, max_tokens=5, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and len(text.split()) == 5  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)


def test_messages_count_tokens_through_the_anthropic_client(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(
        model=MODEL, system="Be brief.", messages=[{"role": "user", "content": "Explain Globus Compute."}]
    )
    assert counted.input_tokens == 5
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="no/such-model", messages=[{"role": "user", "content": "Hi"}])


def test_messages_with_a_bearer_token_on_the_cluster_route(front: ModelServer) -> None:
    claude = anthropic.Anthropic(
        base_url=f"http://{front.host}:{front.port}/resource_server/local/vllm", auth_token=TOKEN, api_key=None
    )
    raw = claude.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Hi"}], stream=True)
    kinds = [event.type for event in raw]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]


def test_messages_errors_are_in_anthropics_shape(claude: anthropic.Anthropic, front: ModelServer) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' must be an integer of at least 1."},
    }
    missing = post(front, "messages", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert missing.status_code == 400
    assert missing.json()["error"] == {"type": "invalid_request_error", "message": "'max_tokens' is required."}
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="no/such-model", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    stranger = anthropic.Anthropic(base_url=str(claude.base_url), api_key="not-a-token", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    bad_json = httpx.post(f"{api_url(front)}/messages", headers=AUTH, content=b"{nope", timeout=30)
    assert bad_json.status_code == 400 and bad_json.json()["type"] == "error"
    assert bad_json.headers["x-request-id"]


# --- rerank, score, tokenizer -------------------------------------------------------------------------------------


def test_rerank_orders_documents(front: ModelServer) -> None:
    documents = ["Globus Compute runs functions remotely.", "Bananas are yellow.", "Parsl scales Python."]
    answer = post(
        front,
        "rerank",
        {"model": "BAAI/bge-reranker-base", "query": "remote functions", "documents": documents, "top_n": 2},
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 2 and results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert results[0]["document"]["text"] == documents[results[0]["index"]]
    assert answer.json()["usage"]["total_tokens"] > 0


def test_score_pairs(front: ModelServer) -> None:
    answer = post(
        front, "score", {"model": "BAAI/bge-reranker-base", "queries": "a question", "documents": ["one", "two"]}
    )
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [item["index"] for item in data] == [0, 1] and all(0 <= item["score"] <= 1 for item in data)


def test_tokenize_and_rerank_through_the_openai_clients_plain_post(client: openai.OpenAI) -> None:
    counted: Any = client.post("/tokenize", body={"model": MODEL, "prompt": "The future of AI is"}, cast_to=object)
    assert counted["count"] == 5
    ranked: Any = client.post("/rerank", body={"model": MODEL, "query": "q", "documents": ["a", "b"]}, cast_to=object)
    assert len(ranked["results"]) == 2


def test_tokenize_and_detokenize_round_trip(front: ModelServer) -> None:
    tokens = post(front, "tokenize", {"model": MODEL, "prompt": "The future of AI is"})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["count"] == 5 and tokens.json()["max_model_len"] > 0
    text = post(front, "detokenize", {"model": MODEL, "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200 and text.json()["prompt"] == "The future of AI is"


def test_answers_of_these_routes_cannot_be_streamed(front: ModelServer) -> None:
    for route in ("rerank", "score", "tokenize", "detokenize"):
        answer = post(front, route, {"model": MODEL, "stream": True})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream", route
    assert post(front, "tokenize", {"prompt": "no model"}).json()["error"]["param"] == "model"


# --- which endpoint serves what -----------------------------------------------------------------------------------


def test_a_route_the_endpoint_does_not_list_is_404(front: ModelServer) -> None:
    answer = post(front, "responses", {"model": "chat-only", "input": "x"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "route_not_served"
    assert "/v1/responses" in answer.json()["error"]["message"] and "narrow/vllm" in answer.json()["error"]["message"]
    messages = post(front, "messages", {"model": "chat-only", "max_tokens": 3, "messages": []})
    assert messages.status_code == 404 and messages.json()["error"]["type"] == "not_found_error"


def test_a_route_the_model_server_lacks_is_404_and_remembered(front: ModelServer) -> None:
    answer = post(front, "rerank", {"model": "routeless", "query": "q", "documents": ["d"]})
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "route_not_served"
    assert "/v1/rerank" in answer.json()["error"]["message"] and "bare/vllm" in answer.json()["error"]["message"]
    listed = httpx.get(f"http://{front.host}:{front.port}/resource_server/list-endpoints", headers=AUTH).json()
    apis = {entry["id"]: entry["apis"] for entry in listed["data"]}
    assert "rerank" not in apis["bare/vllm"] and "responses" in apis["bare/vllm"]
    assert apis["narrow/vllm"] == ["chat/completions"]
    assert {"responses", "messages", "rerank", "score", "tokenize", "detokenize"} <= set(apis["local/vllm"])


def test_the_model_list_says_which_apis_a_model_has(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert models["chat-only"].apis == ["chat/completions"]  # type: ignore[attr-defined]
    assert "messages" in models[MODEL].apis  # type: ignore[attr-defined]
    cluster = httpx.get(f"{str(client.base_url).removesuffix('/v1/')}/narrow/models", headers=AUTH).json()
    assert cluster["data"][0]["apis"] == ["chat/completions"]


def test_a_model_whose_other_endpoint_lacks_the_route_is_served_by_the_one_that_has_it(tmp_path: Path) -> None:
    with simulator(models=(MODEL,)) as backend, RoutelessBackend((MODEL,)) as routeless:
        config = direct_config(endpoint(backend.base_url), endpoint(routeless.base_url, cluster="bare"))
        config["federation"] = {"policy": "round_robin", "status_interval": 0.2, "stale_after": 5}
        with gateway(config, tmp_path) as server:
            listed = f"http://{server.host}:{server.port}/resource_server/list-endpoints"
            for _ in range(20):
                answer = post(server, "rerank", {"model": MODEL, "query": "q", "documents": ["a", "b"]})
                assert answer.status_code == 200, answer.text
                apis = {entry["id"]: entry["apis"] for entry in httpx.get(listed, headers=AUTH).json()["data"]}
                if "rerank" not in apis["bare/vllm"]:
                    break
            assert "rerank" not in apis["bare/vllm"] and "rerank" in apis["local/vllm"]


# --- usage -------------------------------------------------------------------------------------------------------


def test_usage_is_counted_from_each_apis_own_counts(front: ModelServer, home: Path) -> None:
    ids = {name: f"{name}-{os.urandom(4).hex()}" for name in ("rw", "rs", "mw", "ms", "rr")}
    whole = post(
        front,
        "responses",
        {"model": MODEL, "input": "one two three", "max_output_tokens": 4},
        **{"x-request-id": ids["rw"]},
    )
    assert whole.json()["usage"]["output_tokens"] == 4
    streamed = post(
        front,
        "responses",
        {"model": MODEL, "input": "one two", "max_output_tokens": 6, "stream": True},
        **{"x-request-id": ids["rs"]},
    )
    assert streamed.status_code == 200 and "event: response.completed" in streamed.text
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "one two three four"}]}
    assert post(front, "messages", body, **{"x-request-id": ids["mw"]}).json()["usage"]["output_tokens"] == 5
    events = post(front, "messages", {**body, "max_tokens": 3, "stream": True}, **{"x-request-id": ids["ms"]})
    assert "event: message_delta" in events.text
    post(front, "rerank", {"model": MODEL, "query": "q w", "documents": ["d"]}, **{"x-request-id": ids["rr"]})
    rows = usage_rows(home, set(ids.values()))
    counts = {
        name: (rows[rid]["endpoint"], rows[rid]["prompt_tokens"], rows[rid]["completion_tokens"])
        for name, rid in ids.items()
    }
    assert counts == {
        "rw": ("responses", 3, 4),
        "rs": ("responses", 2, 6),
        "mw": ("messages", 4, 5),
        "ms": ("messages", 4, 3),
        "rr": ("rerank", 3, None),
    }
    assert rows[ids["rs"]]["status"] == 200 and rows[ids["rs"]]["stream"]


def test_token_limits_are_held_to_the_models_request_bounds(front: ModelServer, home: Path) -> None:
    ids = {name: f"{name}-{os.urandom(4).hex()}" for name in ("responses", "messages")}
    over = post(
        front,
        "responses",
        {"model": MODEL, "input": "x", "max_output_tokens": 65},
        **{"x-request-id": ids["responses"]},
    )
    assert over.status_code == 400
    assert over.json()["error"]["param"] == "max_output_tokens"
    assert over.json()["error"]["message"] == "'max_output_tokens' must be an integer from 1 to 64."
    question = {"model": MODEL, "max_tokens": 65, "messages": [{"role": "user", "content": "Hi"}]}
    refused = httpx.post(
        f"http://{front.host}:{front.port}/resource_server/local/vllm/v1/messages",
        headers={**AUTH, "x-request-id": ids["messages"]},
        json={**question, "stream": True},
        timeout=30,
    )
    assert refused.status_code == 400
    assert refused.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' must be an integer from 1 to 64."},
    }
    assert post(front, "responses", {"model": MODEL, "input": "x", "max_output_tokens": 64}).status_code == 200
    assert post(front, "messages", {**question, "max_tokens": 64}).status_code == 200
    # Each refusal has its row, under its API, with its status and code.
    rows = usage_rows(home, set(ids.values()))
    refusals = {
        name: (rows[rid]["endpoint"], rows[rid]["status"], rows[rid]["error_code"]) for name, rid in ids.items()
    }
    assert refusals == {
        "responses": ("responses", 400, "invalid_value"),
        "messages": ("messages", 400, "invalid_value"),
    }


def test_the_status_pages_activity_counts_these_routes(front: ModelServer) -> None:
    for route, body in (
        ("tokenize", {"model": MODEL, "prompt": "one two"}),
        ("score", {"model": MODEL, "text_1": "a", "text_2": "b"}),
        ("messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
    ):
        assert post(front, route, body).status_code == 200
    assert post(front, "responses", {"model": MODEL, "input": "x", "max_output_tokens": 0}).status_code == 400
    activity = httpx.get(f"http://{front.host}:{front.port}/resource_server/activity", headers=AUTH, timeout=30)
    entry = next(entry for entry in activity.json()["data"] if entry["model"] == MODEL)
    minutes = entry["minutes"]
    assert sum(minutes["requests_per_second"]) * 60 >= 4
    assert any(rate for rate in minutes["error_rate"] if rate is not None)


# --- a backend that dies mid-stream -------------------------------------------------------------------------------


def test_a_broken_stream_ends_with_each_apis_own_error_event(tmp_path: Path) -> None:
    with simulator("--tpot", "0.05") as doomed, gateway(direct_config(endpoint(doomed.base_url)), tmp_path) as server:
        body = {"model": MODEL, "input": "x", "max_output_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{api_url(server)}/responses", headers=AUTH, json=body, timeout=30) as answer:
            lines = []
            for line in answer.iter_lines():
                lines.append(line)
                if line == "event: response.output_text.delta" and lines.count(line) == 3:
                    os.killpg(doomed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        assert lines[-3] == "event: error"
        error = json.loads(lines[-2].removeprefix("data: "))
        assert error["type"] == "error" and error["code"] == "bad_gateway" and "broken off" in error["message"]
        assert "data: [DONE]" not in lines


def test_a_broken_messages_stream_raises_in_the_anthropic_client(tmp_path: Path) -> None:
    with simulator("--tpot", "0.05") as doomed, gateway(direct_config(endpoint(doomed.base_url)), tmp_path) as server:
        claude = anthropic.Anthropic(base_url=f"http://{server.host}:{server.port}/resource_server", api_key=TOKEN)
        texts = []
        question: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi"}]
        with (
            pytest.raises(anthropic.APIStatusError) as broken,
            claude.messages.stream(model=MODEL, max_tokens=400, messages=question) as stream,
        ):
            for text in stream.text_stream:
                texts.append(text)
                if len(texts) == 3:
                    os.killpg(doomed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        assert "broken off" in broken.value.body["error"]["message"]  # type: ignore[index]
        assert 3 <= len(texts) < 400
