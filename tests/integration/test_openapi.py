"""The gateway's OpenAPI document, and every route fuzzed from it against a running gateway: no answer is a 5xx,
every answer matches the document, every error has the documented shape."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    root = tmp_path_factory.mktemp("fuzzed-batches")
    with simulator() as backend:
        config = {
            "auth": {"providers": ["dev"]},
            "endpoints": [endpoint(backend.base_url, [MODEL])],
            "batches": {"allowed_roots": [str(root)]},
        }
        with gateway(config, tmp_path_factory.mktemp("openapi")) as server:
            yield server


@pytest.fixture(scope="module")
def api_schema(front: ModelServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{front.port}/resource_server/openapi.json")


def test_the_document_names_every_route_of_the_api(front: ModelServer) -> None:
    from gateway.app import ROUTES

    document = httpx.get(f"http://127.0.0.1:{front.port}/resource_server/openapi.json").json()
    described = {
        (f"/resource_server{path}", method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    # WebSocket routes (the nodes' channels) have no methods and are not part of the HTTP API.
    served = {
        (route.path, method) for route in ROUTES for method in getattr(route, "methods", None) or () if method != "HEAD"
    }
    internal = {"/metrics", "/resource_server/internal/streams/{stream_id}", "/resource_server/openapi.json"}
    assert {entry for entry in served if entry[0] not in internal} == described


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_answers_fuzzed_requests_as_documented(
    api_schema: schemathesis.BaseSchema, front: ModelServer, mode: GenerationMode
) -> None:
    # Each operation in turn with Hypothesis (schemathesis's pytest plugin does not run on this pytest yet); every
    # operation is tried even when one fails, and the failures are reported together. Negative requests break the
    # document's rules on purpose: they must get a 4xx in the error shape.
    failures = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=f"http://127.0.0.1:{front.port}/resource_server",
                headers={"authorization": f"Bearer {TOKEN}"},
                checks=[not_a_server_error, content_type_conformance, response_schema_conformance],
                timeout=30,
            )

        try:
            fuzz()
        except Unsatisfiable:
            # An operation without parameters or body (/health) has nothing to break.
            assert mode is GenerationMode.NEGATIVE
        except Exception as exc:
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}: {failure}" for label, failure in failures.items())


def test_every_route_answers_unauthenticated_requests_with_the_error_shape(front: ModelServer) -> None:
    document = httpx.get(f"http://127.0.0.1:{front.port}/resource_server/openapi.json").json()
    shapes = set()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or operation.get("security") == []:
                continue
            url = f"http://127.0.0.1:{front.port}/resource_server{path}".replace("{", "").replace("}", "")
            answer = httpx.request(method, url, timeout=30)
            assert answer.status_code == 401, (method, path, answer.text)
            # The operation's own error shape: OpenAI's, or Anthropic's on the Messages API.
            shape = operation["responses"]["default"]["$ref"].rsplit("/", 1)[-1]
            schema = document["components"]["responses"][shape]["content"]["application/json"]["schema"]
            jsonschema.Draft202012Validator({**schema, **document}).validate(answer.json())
            shapes.add(shape)
    assert shapes == {"Error", "AnthropicError"}


def test_real_answers_match_the_documents_schemas(front: ModelServer) -> None:
    base = f"http://127.0.0.1:{front.port}/resource_server"
    document = httpx.get(f"{base}/openapi.json").json()

    def check(answer: httpx.Response, schema: str) -> None:
        assert answer.status_code == 200, answer.text
        validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}", **document})
        validator.validate(answer.json())

    auth = {"authorization": f"Bearer {TOKEN}"}
    question = [{"role": "user", "content": "What is the boiling point of water?"}]
    with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
        check(client.post("/v1/chat/completions", json={"model": MODEL, "messages": question}), "ChatCompletion")
        check(client.post("/v1/completions", json={"model": MODEL, "prompt": "Water boils at"}), "TextCompletion")
        check(client.post("/v1/embeddings", json={"model": MODEL, "input": "water"}), "Embeddings")
        check(client.get("/v1/models"), "ModelList")
        check(client.get("/list-endpoints"), "EndpointList")
        check(client.get("/health"), "Health")
        check(client.get("/ready"), "Ready")
        check(client.get("/whoami"), "Identity")
        check(client.get("/status"), "Status")
        check(client.post("/v1/responses", json={"model": MODEL, "input": "Water boils at"}), "Response")
        anthropic = {"model": MODEL, "messages": question[:1], "max_tokens": 8}
        check(client.post("/v1/messages", json=anthropic), "Message")
        check(client.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": question}), "TokenCount")
        ranked = {"model": MODEL, "query": "water", "documents": ["boils at 100 C", "ice"]}
        check(client.post("/v1/rerank", json=ranked), "Rerank")
        check(client.post("/v1/score", json={"model": MODEL, "text_1": "water", "text_2": ["ice", "steam"]}), "Score")
        tokens = client.post("/v1/tokenize", json={"model": MODEL, "prompt": "Water boils"})
        check(tokens, "Tokenized")
        detokenized = {"model": MODEL, "tokens": tokens.json()["tokens"]}
        check(client.post("/local/vllm/v1/detokenize", json=detokenized), "Detokenized")
        check(client.get("/activity"), "Activity")
        check(client.get("/local/models"), "ClusterModels")
        check(client.get("/local/jobs"), "ClusterJobs")
        line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL}}
        stored = client.post(
            "/v1/files", files={"file": ("in.jsonl", json.dumps(line).encode())}, data={"purpose": "batch"}
        )
        check(stored, "File")
        batch = client.post(
            "/v1/batches", json={"input_file_id": stored.json()["id"], "endpoint": "/v1/chat/completions"}
        )
        check(batch, "Batch")
        check(client.get("/v1/batches"), "BatchList")
        check(client.post(f"/v1/batches/{batch.json()['id']}/cancel"), "Batch")
