"""What a hostile or careless client sends, through a real gateway process: every answer is a clear 4xx in the
documented error shape, never a 500, and the gateway keeps serving everyone else."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.databases import asyncpg_url, scratch_database
from tests.support import TOKEN, api_url, endpoint, gateway, metric, scrape, simulator

MODEL = "facebook/opt-125m"
SMALL = "small-context-model"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
HEADERS = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator(models=(MODEL, SMALL)) as server:
        yield server


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def front(backend: ModelServer, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    # PostgreSQL, as in production: it refuses some text SQLite keeps (a NUL byte).
    with scratch_database() as url:
        config = {
            "auth": {"providers": ["dev"]},
            "endpoints": [endpoint(backend.base_url, [MODEL, SMALL])],
            "database": {"url": asyncpg_url(url)},
            "request_bounds": {"models": {SMALL: {"max_tokens": 100}}},
            "batches": {"allowed_roots": [str(root)], "poll_interval": 0.2},
        }
        with gateway(config, tmp_path_factory.mktemp("hostile")) as server:
            yield server


@pytest.fixture
def client(front: ModelServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code", "param"}, body
    return dict(body["error"])


def post(server: ModelServer, path: str, **kwargs: Any) -> httpx.Response:
    headers = {**HEADERS, **kwargs.pop("headers", {})}
    return httpx.post(f"{api_url(server)}/{path}", headers=headers, timeout=30, **kwargs)


def nested(depth: int) -> Any:
    value: Any = "deep"
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


# --- deeply nested JSON ----------------------------------------------------------------------------------------

DEEP_BODIES = [
    ("chat/completions", {"model": MODEL, "messages": QUESTION, "tools": None}, "tools"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": None}]}, "messages"),
    ("completions", {"model": MODEL, "prompt": "hello", "logit_bias": None}, "logit_bias"),
    ("embeddings", {"model": MODEL, "input": "hello", "user": None}, "user"),
    ("batches", {"model": MODEL, "input_file_path": "/x", "output_folder_path": "/y", "metadata": None}, "metadata"),
]


@pytest.mark.parametrize("depth", [65, 255, 600, 1024, 5000])
@pytest.mark.parametrize(("path", "body", "field"), DEEP_BODIES)
def test_deeply_nested_json_in_any_field_is_400(
    front: ModelServer, path: str, body: dict[str, Any], field: str, depth: int
) -> None:
    if field == "messages":
        body = {**body, "messages": [{"role": "user", "content": nested(depth)}]}
    else:
        body = {**body, field: nested(depth)}
    # Written by hand: json.dumps itself stops at Python's recursion limit.
    raw = _dumps(body)
    response = post(front, path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "json_too_deep" and "64 levels" in error["message"]


def test_nesting_within_the_limit_still_passes(client: openai.OpenAI) -> None:
    # A tool's JSON schema nests a few levels; the metadata field carries any shape on to the backend.
    answer = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, extra_body={"metadata_tree": nested(40)}
    )  # type: ignore[call-overload]
    assert answer.choices[0].finish_reason == "length"


def _dumps(value: Any) -> bytes:
    parts: list[bytes] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bytes):
            parts.append(item)
        elif isinstance(item, dict):
            stack.append(b"}")
            for index, (key, child) in enumerate(reversed(list(item.items()))):
                stack.append(child)
                stack.append(f'"{key}":'.encode())
                if index < len(item) - 1:
                    stack.append(b",")
            stack.append(b"{")
        elif isinstance(item, list):
            stack.append(b"]")
            for index, child in enumerate(reversed(item)):
                stack.append(child)
                if index < len(item) - 1:
                    stack.append(b",")
            stack.append(b"[")
        elif item is None:
            parts.append(b"null")
        elif isinstance(item, str):
            parts.append(f'"{item}"'.encode())
        else:
            parts.append(str(item).encode())
    return b"".join(parts)


# --- absurd numbers --------------------------------------------------------------------------------------------

HUGE = 2**63 - 1

ABSURD = [
    ("chat", {"n": HUGE}, "n"),
    ("chat", {"n": 129}, "n"),
    ("chat", {"max_tokens": HUGE}, "max_tokens"),
    ("chat", {"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ("chat", {"logprobs": True, "top_logprobs": 10**6}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": 5}, "logprobs"),
    ("completions", {"n": HUGE}, "n"),
    ("completions", {"best_of": HUGE}, "best_of"),
    ("completions", {"n": 4, "best_of": 2}, "best_of"),
    ("completions", {"logprobs": 2**40}, "logprobs"),
    ("completions", {"max_tokens": 2**62}, "max_tokens"),
    ("embeddings", {"dimensions": HUGE}, "dimensions"),
    ("embeddings", {"dimensions": 0}, "dimensions"),
]


@pytest.mark.parametrize(("route", "extra", "param"), ABSURD)
def test_absurd_numbers_are_refused_by_the_gateway(
    client: openai.OpenAI, route: str, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        if route == "chat":
            client.chat.completions.create(model=MODEL, messages=QUESTION, **extra)  # type: ignore[call-overload]
        elif route == "completions":
            client.completions.create(model=MODEL, prompt="hello", **extra)  # type: ignore[call-overload]
        else:
            client.embeddings.create(model=MODEL, input="hello", **extra)
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == ("invalid_type" if param == "logprobs" and route == "chat" else "invalid_value")


def test_a_model_has_its_own_bounds(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMALL, messages=QUESTION, max_tokens=101)  # type: ignore[arg-type]
    assert "from 1 to 100" in str(refused.value)
    assert client.chat.completions.create(model=SMALL, messages=QUESTION, max_tokens=100).choices  # type: ignore[arg-type]
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=101).choices  # type: ignore[arg-type]


def test_numbers_within_the_bounds_are_served(client: openai.OpenAI) -> None:
    answer = client.completions.create(model=MODEL, prompt="hello", n=3, best_of=3, max_tokens=2)
    assert len(answer.choices) == 3
    vectors = client.embeddings.create(model=MODEL, input="hello", dimensions=8)
    assert len(vectors.data[0].embedding) == 8


# --- NUL bytes where the operating system and PostgreSQL take none ----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_file_path", "/scratch/in\x00put.jsonl"),
        ("output_folder_path", "/scratch/out\x00"),
        ("model", "facebook\x00/opt"),
        ("metadata", {"project": "a\x00b"}),
    ],
)
def test_a_nul_byte_in_a_batch_is_400(front: ModelServer, root: Path, field: str, value: Any) -> None:
    source = root / "input.jsonl"
    source.write_text("")
    body = {"model": MODEL, "input_file_path": str(source), "output_folder_path": str(root / "out"), field: value}
    response = post(front, "batches", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == field and "NUL" in error["message"]


@pytest.mark.parametrize("path", ["batches/batch_%00x", "files/file-%00x", "files/file-%00x/content"])
def test_a_nul_byte_in_an_id_is_404(front: ModelServer, path: str) -> None:
    response = httpx.get(f"{api_url(front)}/{path}", headers=HEADERS, timeout=30)
    assert response.status_code == 404 and error_of(response)["type"] == "invalid_request_error"


def test_a_nul_byte_in_an_uploaded_file_name_is_dropped(front: ModelServer) -> None:
    line = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}\n'
    # Written by hand: HTTP clients percent-encode the NUL byte of a file name.
    form = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="in\x00put.jsonl"\r\n\r\n'
        + line
        + b"\r\n--b--\r\n"
    )
    response = post(front, "files", content=form, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "input.jsonl"


# --- a client that leaves mid-upload ---------------------------------------------------------------------------


def _leave_mid_upload(server: ModelServer, path: str, content_type: str, start: bytes) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as connection:
        head = (
            f"POST /resource_server/v1/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
        )
        connection.sendall(head.encode() + start)


def _requests(server: ModelServer, status: int) -> float:
    text = scrape(f"http://{server.host}:{server.port}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{") and f'status="{status}"' in line
    )


def test_a_client_leaving_mid_upload_is_not_an_internal_error(front: ModelServer) -> None:
    before_500, before_499 = _requests(front, 500), _requests(front, 499)
    json_start = b'{"model": "facebook/opt-125m", "messages": ['
    form_start = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"custom_id": '
    for path, content_type, start in [
        ("chat/completions", "application/json", json_start),
        ("embeddings", "application/json", json_start),
        ("batches", "application/json", json_start),
        ("files", "multipart/form-data; boundary=b", form_start),
    ]:
        _leave_mid_upload(front, path, content_type, start)
    # The next request on a new connection is answered after the gateway has noted the four that left.
    client = openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1).choices  # type: ignore[arg-type]
    for _ in range(50):
        if _requests(front, 499) - before_499 >= 4:
            break
        client.models.list()
    assert _requests(front, 499) - before_499 == 4
    assert _requests(front, 500) == before_500
    assert metric(scrape(f"http://{front.host}:{front.port}/metrics"), "gateway_requests_total") > 0


# --- what the HTTP server answers before the application sees a request ----------------------------------------


def _raw(server: ModelServer, data: bytes) -> bytes:
    """Send ``data`` on a new connection; the gateway's first answer (b"" if it closed without one)."""
    answer = b""
    with socket.create_connection((server.host, server.port), timeout=30) as connection:
        try:
            connection.sendall(data)
            while chunk := connection.recv(65536):
                answer += chunk
                head, _, body = answer.partition(b"\r\n\r\n")
                length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
                if length and len(body) >= int(length[0].split(b":")[1]):
                    break
        except ConnectionResetError:
            pass
    return answer


def _error_answer(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    error = httpx.Response(status, content=body)
    return status, error_of(error)


def test_a_huge_header_is_refused_before_it_is_whole_and_others_are_served(
    front: ModelServer, client: openai.OpenAI
) -> None:
    head = b"GET /resource_server/health HTTP/1.1\r\nHost: x\r\nX-Huge: "
    answer = _raw(front, head + b"a" * (8 << 20) + b"\r\n\r\n")
    # The gateway stops reading at the bound: the client gets the 431, or a reset if it was still sending.
    if answer:
        status, error = _error_answer(answer)
        assert status == 431 and error["code"] == "headers_too_large"
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1).choices  # type: ignore[arg-type]


def test_a_header_just_over_the_bound_gets_431_in_the_error_shape(front: ModelServer) -> None:
    answer = _raw(front, b"GET /resource_server/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    status, error = _error_answer(answer)
    assert status == 431 and error["code"] == "headers_too_large" and "65536 bytes" in error["message"]


def test_too_many_headers_get_431(front: ModelServer) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % index for index in range(101))
    request = b"GET /resource_server/health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    status, error = _error_answer(_raw(front, request))
    assert status == 431 and "more than 100 headers" in error["message"]


def test_a_huge_query_string_gets_414(front: ModelServer) -> None:
    line = b"GET /resource_server/health?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    status, error = _error_answer(_raw(front, line))
    assert status == 414 and error["code"] == "uri_too_long"


@pytest.mark.parametrize(
    "request_line",
    [
        b"FROB /resource_server/health HTTP/1.1",  # an unknown method
        b"GET /resource_server/health HTTP/9.9",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS spoken to the plain-HTTP port
    ],
)
def test_a_malformed_request_gets_400_in_the_error_shape(front: ModelServer, request_line: bytes) -> None:
    status, error = _error_answer(_raw(front, request_line + b"\r\nHost: x\r\n\r\n"))
    assert status == 400 and error["code"] == "invalid_http_request"


def test_a_bad_header_gets_400_in_the_error_shape(front: ModelServer) -> None:
    answer = _raw(front, b"GET /resource_server/health HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n")
    status, error = _error_answer(answer)
    assert status == 400 and error["code"] == "invalid_http_request"


def test_a_websocket_upgrade_is_answered_as_plain_http(front: ModelServer) -> None:
    upgrade = (
        b"GET /resource_server/v1/chat/completions HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status, error = _error_answer(_raw(front, upgrade))
    assert status == 405 and error["code"] == "method_not_allowed"


def test_a_large_body_sent_with_its_head_in_one_write_is_served(front: ModelServer) -> None:
    # Most of the first read is body, not head: only what arrives before the head's end counts against the bound.
    body = b'{"model": "facebook/opt-125m", "input": "' + b"word " * 20_000 + b'"}'
    head = (
        f"POST /resource_server/v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = _raw(front, head + body)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
