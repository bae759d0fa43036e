"""The vLLM-compatible simulator, used as a scientist would use vLLM: the openai client over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import math
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam

from gateway.simulator import SimulatorSettings, create_app
from gateway.simulator.engine import Engine, generate, synthesize

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
OTHER_MODEL = "facebook/opt-125m"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the boiling point of water at sea level?"}
]


class RunningSimulator:
    """The simulator under uvicorn (uvloop, httptools) in a background thread, on a free loopback port."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(settings), loop="uvloop", http="httptools", lifespan="on", access_log=False, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> RunningSimulator:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the simulator did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="not-checked", max_retries=0, timeout=10)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        answer = httpx.get(f"{self.url}/metrics")
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(answer.text)

    def load(self, model: str = MODEL) -> tuple[float, float]:
        """(running, waiting) requests, as /metrics reports them."""
        metrics = self.metrics()
        labels = frozenset({"engine": "0", "model_name": model}.items())
        return metrics[("vllm:num_requests_running", labels)], metrics[("vllm:num_requests_waiting", labels)]

    def gauge(self, name: str, model: str = MODEL, **labels: str) -> float:
        key = frozenset({"engine": "0", "model_name": model, **labels}.items())
        return self.metrics()[(name, key)]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\} (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict reader of the text exposition format: every sample belongs to the family declared just above it."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    declared: dict[str, str] = {}
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in declared
            declared[name] = kind
            current = name
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a valid sample line: {line!r}"
        name, labels, value = match.groups()
        assert name == current, f"{name} is outside its family"
        samples[(name, frozenset(_LABEL.findall(labels)))] = float(value)
    return samples


@pytest.fixture(scope="module")
def simulator() -> Iterator[RunningSimulator]:
    with RunningSimulator(SimulatorSettings(models=(MODEL, OTHER_MODEL), max_model_len=4096)) as running:
        yield running


@pytest.fixture(scope="module")
def slow_simulator() -> Iterator[RunningSimulator]:
    settings = SimulatorSettings(models=(MODEL,), ttft=0.2, tpot=0.02, max_num_seqs=2)
    with RunningSimulator(settings) as running:
        yield running


def sse_events(raw: bytes) -> list[Any]:
    """The events of a text/event-stream body; every event must be one ``data:`` line and a blank line."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    events = text.split("\n\n")
    assert events[-1] == ""
    parsed: list[Any] = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event
        payload = event.removeprefix("data: ")
        parsed.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return parsed


# Chat completions --------------------------------------------------------------------------------------------


def test_chat_completion_whole_answer(simulator: RunningSimulator) -> None:
    answer = simulator.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12)
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-")
    assert answer.model == MODEL
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert choice.message.content is not None and len(choice.message.content.split()) == 12
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (10, 12, 22)

    raw = httpx.post(f"{simulator.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION}).json()
    assert "tool_calls" not in raw["choices"][0]["message"]  # vLLM drops an empty list
    assert raw["choices"][0]["message"]["refusal"] is None
    assert raw["choices"][0]["logprobs"] is None
    assert isinstance(raw["created"], int) and raw["simulated"] is True
    assert {"prompt_tokens", "completion_tokens", "total_tokens"} <= set(raw["usage"])


def test_chat_counts_text_parts_and_defaults_max_tokens(simulator: RunningSimulator) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Name three"}, {"type": "text", "text": "noble gases"}]},
    ]
    answer = simulator.client().chat.completions.create(model=MODEL, messages=messages)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 7
    assert answer.usage.completion_tokens == 16


def test_max_completion_tokens_wins_over_max_tokens(simulator: RunningSimulator) -> None:
    answer = simulator.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=9, max_completion_tokens=4
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 4


def test_same_request_same_answer(simulator: RunningSimulator) -> None:
    client = simulator.client()
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0.9, seed=3)
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20)
    other = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Something else entirely"}], max_tokens=20
    )
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


def test_chat_stream_without_usage(simulator: RunningSimulator) -> None:
    client = simulator.client()
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    tokens = chunks[1:]
    assert len(tokens) == 8
    assert all(chunk.object == "chat.completion.chunk" and chunk.usage is None for chunk in chunks)
    assert all(chunk.id == chunks[0].id for chunk in chunks)
    assert [chunk.choices[0].finish_reason for chunk in tokens] == [None] * 7 + ["length"]
    deltas = [chunk.choices[0].delta.content or "" for chunk in tokens]
    assert all(delta.startswith(" ") and len(delta.split()) == 1 for delta in deltas)
    assert "".join(deltas) == whole.choices[0].message.content

    raw = httpx.post(
        f"{simulator.url}/v1/chat/completions",
        json={"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.content)
    assert len(events) == 5 and events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])
    assert events[-2]["choices"][0]["stop_reason"] is None


def test_chat_stream_with_usage(simulator: RunningSimulator) -> None:
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(httpx.post(f"{simulator.url}/v1/chat/completions", json=body).content)
    assert len(events) == 1 + 5 + 1 + 1
    assert all(event["usage"] is None for event in events[:6])
    assert events[6]["choices"] == []
    assert events[6]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}

    chunks = list(
        simulator.client().chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_continuous_usage_stats(simulator: RunningSimulator) -> None:
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    events = sse_events(httpx.post(f"{simulator.url}/v1/chat/completions", json=body).content)
    assert [event["usage"]["completion_tokens"] for event in events[:-1]] == [0, 1, 2, 3, 3]


def test_stop_string_cuts_the_answer(simulator: RunningSimulator) -> None:
    client = simulator.client()
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10).choices[0].message.content
    assert full is not None
    words = full.split()
    # The first word that appears only once, so the cut point is unambiguous.
    position = next(
        i for i, word in enumerate(words) if i >= 2 and words.count(word) == 1 and word not in " ".join(words[:i])
    )
    stop = words[position]
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, stop=[stop, "zzz"])
    expected = full[: full.index(stop)]
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == position + 1

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, stop=stop, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices(simulator: RunningSimulator) -> None:
    client = simulator.client()
    single = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6)
    several = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, n=3)
    assert [choice.index for choice in several.choices] == [0, 1, 2]
    assert several.choices[0].message.content == single.choices[0].message.content
    assert len({choice.message.content for choice in several.choices}) == 3
    assert several.usage is not None and several.usage.completion_tokens == 18 and several.usage.prompt_tokens == 10

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, n=3, stream=True))
    for index in range(3):
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices[0].index == index)
        assert text == several.choices[index].message.content


# Completions -------------------------------------------------------------------------------------------------


def test_completion_whole_and_streamed(simulator: RunningSimulator) -> None:
    client = simulator.client()
    whole = client.completions.create(model=OTHER_MODEL, prompt="The capital of France is", max_tokens=7)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert len(whole.choices[0].text.split()) == 7 and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (5, 7)

    chunks = list(
        client.completions.create(
            model=OTHER_MODEL,
            prompt="The capital of France is",
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12


def test_completion_prompt_forms(simulator: RunningSimulator) -> None:
    client = simulator.client()
    batch = client.completions.create(model=OTHER_MODEL, prompt=["one two", "three four five"], max_tokens=2, n=2)
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    assert batch.usage is not None and (batch.usage.prompt_tokens, batch.usage.completion_tokens) == (5, 8)
    alone = client.completions.create(model=OTHER_MODEL, prompt="three four five", max_tokens=2)
    assert batch.choices[2].text == alone.choices[0].text

    ids = client.completions.create(model=OTHER_MODEL, prompt=[101, 2023, 2003, 102], max_tokens=1)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4
    id_batch = client.completions.create(model=OTHER_MODEL, prompt=[[1, 2], [3, 4, 5]], max_tokens=1)
    assert id_batch.usage is not None and id_batch.usage.prompt_tokens == 5 and len(id_batch.choices) == 2


# Embeddings, models, health ----------------------------------------------------------------------------------


def test_embeddings_float_and_base64(simulator: RunningSimulator) -> None:
    client = simulator.client()
    texts = ["a sentence about water", "another one"]
    # The openai client asks for base64 unless told otherwise, and decodes it.
    default = client.embeddings.create(model=MODEL, input=texts)
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert default.object == "list" and default.model == MODEL
    assert [item.index for item in default.data] == [0, 1]
    assert [item.embedding for item in default.data] == [item.embedding for item in floats.data]
    for item in floats.data:
        assert len(item.embedding) == 16
        assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-5)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens == 6 and floats.usage.total_tokens == 6

    raw = httpx.post(
        f"{simulator.url}/v1/embeddings", json={"model": MODEL, "input": "another one", "encoding_format": "base64"}
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack("<16f", packed)) == floats.data[1].embedding

    # As a Matryoshka model in vLLM: fewer dimensions than the model's own, never more.
    narrow = client.embeddings.create(model=MODEL, input=[[5, 6, 7]], dimensions=8, encoding_format="float")
    assert len(narrow.data[0].embedding) == 8 and narrow.usage.prompt_tokens == 3


def test_models_list(simulator: RunningSimulator) -> None:
    models = simulator.client().models.list()
    assert [model.id for model in models.data] == [MODEL, OTHER_MODEL]
    raw = httpx.get(f"{simulator.url}/v1/models").json()
    assert raw["object"] == "list"
    entry = raw["data"][0]
    assert entry["object"] == "model" and entry["root"] == MODEL and entry["parent"] is None
    assert entry["max_model_len"] == 4096 and entry["permission"] == []
    assert entry["simulated"] is True and entry["owned_by"] == "simulator"


def test_health(simulator: RunningSimulator) -> None:
    answer = httpx.get(f"{simulator.url}/health")
    assert answer.status_code == 200 and answer.content == b""


def test_metrics_count_tokens_and_requests(simulator: RunningSimulator) -> None:
    def read(name: str, **labels: str) -> float:
        return simulator.gauge(name, model=OTHER_MODEL, **labels)

    before_prompt = read("vllm:prompt_tokens_total")
    before_generated = read("vllm:generation_tokens_total")
    before_length = read("vllm:request_success_total", finished_reason="length")
    simulator.client().completions.create(model=OTHER_MODEL, prompt="four words of prompt", max_tokens=3)
    assert read("vllm:prompt_tokens_total") == before_prompt + 4
    assert read("vllm:generation_tokens_total") == before_generated + 3
    assert read("vllm:request_success_total", finished_reason="length") == before_length + 1
    assert read("vllm:num_requests_running") == 0
    assert read("vllm:num_requests_waiting") == 0


# Errors ------------------------------------------------------------------------------------------------------


def test_unknown_model_is_404(simulator: RunningSimulator) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        simulator.client().chat.completions.create(model="no/such-model", messages=QUESTION)
    assert raised.value.status_code == 404
    error = raised.value.response.json()["error"]
    assert error["type"] == "NotFoundError" and error["code"] == 404
    assert error["message"] == "The model `no/such-model` does not exist."
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[1, 2]"),
        ("/v1/chat/completions", orjson.dumps({"model": MODEL})),
        ("/v1/chat/completions", orjson.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 0})),
        ("/v1/chat/completions", orjson.dumps({"model": MODEL, "messages": QUESTION, "n": 0})),
        ("/v1/chat/completions", orjson.dumps({"model": MODEL, "messages": QUESTION, "stop": 5})),
        (
            "/v1/chat/completions",
            orjson.dumps({"model": MODEL, "messages": QUESTION, "stream_options": {"include_usage": True}}),
        ),
        ("/v1/chat/completions", orjson.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 5000})),
        ("/v1/completions", orjson.dumps({"model": MODEL})),
        ("/v1/completions", orjson.dumps({"model": MODEL, "prompt": [1, "mixed"]})),
        ("/v1/embeddings", orjson.dumps({"model": MODEL, "input": {"text": "x"}})),
        ("/v1/embeddings", orjson.dumps({"model": MODEL, "input": "x", "encoding_format": "hex"})),
    ],
)
def test_bad_requests_are_400(simulator: RunningSimulator, path: str, body: bytes) -> None:
    answer = httpx.post(f"{simulator.url}{path}", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["message"]


@pytest.mark.parametrize(
    ("call", "extra", "message"),
    [
        ("chat", {"n": 2**63 - 1}, f"n must be at most 16384, got {2**63 - 1}"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "greater than max allowed: 20"),
        ("chat", {"logprobs": True, "top_logprobs": -2}, "top_logprobs must be non-negative or -1"),
        ("completions", {"n": 16385}, "n must be at most 16384"),
        ("completions", {"logprobs": 2**40}, "greater than max allowed: 20"),
        ("embeddings", {"dimensions": 2**62}, "only supports dimensions in range [1, 16]"),
    ],
)
def test_absurd_numbers_are_refused_as_vllm_refuses_them(
    simulator: RunningSimulator, call: str, extra: dict[str, Any], message: str
) -> None:
    client = simulator.client()
    with pytest.raises(openai.BadRequestError) as refused:
        if call == "chat":
            client.chat.completions.create(model=MODEL, messages=QUESTION, **extra)
        elif call == "completions":
            client.completions.create(model=MODEL, prompt="hello", **extra)
        else:
            client.embeddings.create(model=MODEL, input="hello", **extra)
    error = refused.value.response.json()["error"]
    assert message in error["message"] and error["param"] == next(iter(extra.keys() - {"logprobs"}), "logprobs")


def test_context_length_error_through_the_client(simulator: RunningSimulator) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length is 4096"):
        simulator.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5000)


def test_wrong_method_and_unknown_path(simulator: RunningSimulator) -> None:
    wrong = httpx.get(f"{simulator.url}/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == 405
    missing = httpx.get(f"{simulator.url}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"


# Timing, queueing, disconnects -------------------------------------------------------------------------------


def test_stream_follows_ttft_and_tpot(slow_simulator: RunningSimulator) -> None:
    client = slow_simulator.client()
    started = time.monotonic()
    first_token_at = None
    count = 0
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            count += 1
            first_token_at = first_token_at or time.monotonic() - started
    total = time.monotonic() - started
    assert count == 10
    assert first_token_at is not None and 0.18 <= first_token_at <= 1.0
    assert 0.3 <= total <= 1.5  # 0.2 s to the first token, then 9 x 0.02 s

    started = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10)
    assert 0.3 <= time.monotonic() - started <= 1.5


async def _stream_times(app: Any, tokens: int, write_takes: float = 0.0) -> list[float]:
    """When each content token of one streamed chat answer is written, the app called as uvicorn calls it."""
    body = orjson.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": tokens, "stream": True})
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    written: list[float] = []

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.sleep(3600)  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if b'"content":"' in message.get("body", b"") and b'"role"' not in message["body"]:
            written.append(time.monotonic())
        if write_takes:
            await asyncio.sleep(write_takes)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    await app(scope, receive, send)
    assert len(written) == tokens
    return written


async def test_a_stream_keeps_its_schedule_when_each_write_is_late() -> None:
    # Each write takes 15 ms, as on a busy machine: the tokens still come 20 ms apart, not 35 ms.
    app = create_app(SimulatorSettings(models=(MODEL,), tpot=0.02))
    written = await _stream_times(app, 20, write_takes=0.015)
    # The first token waits for the role chunk's write, the last goes when due: 0.365 s. Counted from each write
    # instead, the 19 steps would take 0.665 s.
    assert 0.35 <= written[-1] - written[0] <= 0.5


def test_requests_beyond_max_num_seqs_wait(slow_simulator: RunningSimulator) -> None:
    client = slow_simulator.client()
    finished: list[float] = []

    def ask() -> None:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10)
        finished.append(time.monotonic())

    started = time.monotonic()
    threads = [threading.Thread(target=ask) for _ in range(5)]
    for thread in threads:
        thread.start()
    wait_for(lambda: slow_simulator.load() == (2, 3), timeout=0.35)
    for thread in threads:
        thread.join()
    assert len(finished) == 5
    # Two at a time: the last of five ends after three rounds of ~0.38 s.
    assert max(finished) - started >= 1.0
    assert slow_simulator.load() == (0, 0)


def test_client_disconnect_frees_the_slot(slow_simulator: RunningSimulator) -> None:
    aborted = slow_simulator.gauge("vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 500, "stream": True}
    with (
        httpx.Client(base_url=slow_simulator.url, timeout=10) as first,
        httpx.Client(base_url=slow_simulator.url, timeout=10) as second,
        httpx.Client(base_url=slow_simulator.url, timeout=10) as third,
        first.stream("POST", "/v1/chat/completions", json=body) as running_one,
        second.stream("POST", "/v1/chat/completions", json=body) as running_two,
    ):
        # Keep the line iterators alive: closing one closes its connection.
        lines = [running_one.iter_lines(), running_two.iter_lines()]
        assert [next(line).startswith("data: ") for line in lines] == [True, True]
        with third.stream("POST", "/v1/chat/completions", json=body):
            # The stream's headers come at once; the request then waits for a slot.
            assert slow_simulator.load() == (2, 1)
        wait_for(lambda: slow_simulator.load() == (2, 0))
    # 500 tokens would take 10 s; hanging up ends them at once.
    wait_for(lambda: slow_simulator.load() == (0, 0))
    wait_for(lambda: slow_simulator.gauge("vllm:request_success_total", finished_reason="abort") == aborted + 3)


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# The parts on their own ---------------------------------------------------------------------------------------


def test_stop_string_ending_inside_a_token() -> None:
    pieces = synthesize(12345, 6)
    target = pieces[3]  # " word": stop on its last two letters
    output = generate(0, 12345, 6, ("zzz", target[-2:]))
    text = "".join(pieces)
    cut = text.index(target[-2:])
    assert output.text == text[:cut]
    assert output.finish_reason == "stop" and output.stop_reason == target[-2:]
    assert len(output.pieces) == text[: cut + 2].count(" ")


def test_stop_string_spanning_tokens() -> None:
    pieces = synthesize(4242, 8)
    stop = (pieces[2] + pieces[3] + pieces[4]).strip()
    output = generate(0, 4242, 8, (stop,))
    assert output.text == "".join(pieces[:2]) + " "
    assert output.pieces[3:] == ["", ""] and len(output.pieces) == 5


def test_earliest_completed_stop_string_wins() -> None:
    pieces = synthesize(777, 8)
    early, late = pieces[1].strip(), pieces[4] + pieces[5]
    output = generate(0, 777, 8, (late, early))
    assert output.stop_reason == early and len(output.pieces) == 2


def test_answers_longer_than_the_word_sequence() -> None:
    assert len(synthesize(5, 20_000)) == 20_000


@pytest.mark.asyncio
async def test_engine_queues_in_order_and_survives_cancellation() -> None:
    engine = Engine("m", max_num_seqs=1)
    await engine.acquire()
    order: list[str] = []

    async def wait_then_run(name: str) -> None:
        await engine.acquire()
        order.append(name)
        engine.release()

    first = asyncio.create_task(wait_then_run("first"))
    gone = asyncio.create_task(wait_then_run("gone"))
    last = asyncio.create_task(wait_then_run("last"))
    await asyncio.sleep(0)
    assert (engine.running, engine.waiting) == (1, 3)
    gone.cancel()
    await asyncio.sleep(0)
    assert engine.waiting == 2
    engine.release()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]
    assert (engine.running, engine.waiting) == (0, 0)


def test_simulator_imports_nothing_else_from_the_gateway() -> None:
    probe = (
        "import json, sys, gateway.simulator.__main__; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('gateway', 'starlette')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert orjson.loads(loaded) == [
        "gateway",
        "gateway.simulator",
        "gateway.simulator.__main__",
        "gateway.simulator.answers",
        "gateway.simulator.apis",
        "gateway.simulator.asgi",
        "gateway.simulator.engine",
        "gateway.simulator.fields",
        "gateway.simulator.metrics",
        "gateway.simulator.server",
    ]
