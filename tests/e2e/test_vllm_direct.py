"""The official OpenAI client straight against the real vLLM, without the gateway.

These pin down what the backend itself answers, so that a difference seen through the gateway is the gateway's.
The model's weights are random: the tests check shapes, finish reasons and token counts, never the text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from .conftest import VllmServer

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a short story about a small robot."},
]
PROMPT = "Once upon a time, a small robot"
# The random model may draw the end-of-sequence token at any step; ignoring it makes the length exact.
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(vllm_server: VllmServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vllm_server.base_url, api_key=vllm_server.api_key, max_retries=0, timeout=60) as client:
        yield client


def async_client(server: VllmServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=60)


def check_usage(usage: openai.types.CompletionUsage | None, completion_tokens: int) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens == completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def check_chat(answer: openai.types.chat.ChatCompletion, model: str, max_tokens: int) -> None:
    assert answer.object == "chat.completion"
    assert answer.model == model
    assert answer.id
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.index == 0
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    check_usage(answer.usage, max_tokens)


def check_chat_stream(chunks: list[openai.types.chat.ChatCompletionChunk], model: str, max_tokens: int) -> None:
    assert chunks, "the stream carried no chunk"
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {model}
    assert len({chunk.id for chunk in chunks}) == 1
    *body, last = chunks
    # With include_usage the last chunk has no choices and the whole request's usage; the others have no usage.
    assert last.choices == []
    check_usage(last.usage, max_tokens)
    assert all(chunk.usage is None for chunk in body)
    assert all(len(chunk.choices) == 1 and chunk.choices[0].index == 0 for chunk in body)
    assert body[0].choices[0].delta.role == "assistant"
    finishes = [chunk.choices[0].finish_reason for chunk in body if chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert body[-1].choices[0].finish_reason == "length"
    content_chunks = [chunk for chunk in body if chunk.choices[0].delta.content]
    assert 0 < len(content_chunks) <= max_tokens


def check_completion(answer: openai.types.Completion, model: str, max_tokens: int, n: int = 1) -> None:
    assert answer.object == "text_completion"
    assert answer.model == model
    assert sorted(choice.index for choice in answer.choices) == list(range(n))
    assert all(choice.finish_reason == "length" for choice in answer.choices)
    assert all(isinstance(choice.text, str) for choice in answer.choices)
    check_usage(answer.usage, max_tokens * n)


def check_completion_stream(chunks: list[openai.types.Completion], model: str, max_tokens: int) -> None:
    assert chunks, "the stream carried no chunk"
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert {chunk.model for chunk in chunks} == {model}
    *body, last = chunks
    assert last.choices == []
    check_usage(last.usage, max_tokens)
    assert all(chunk.usage is None for chunk in body)
    finishes = [chunk.choices[0].finish_reason for chunk in body if chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert 0 < len([chunk for chunk in body if chunk.choices[0].text]) <= max_tokens


def test_models_lists_the_served_name(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    assert [model.id for model in client.models.list()] == [vllm_server.model]


def test_chat_completion(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    answer = client.chat.completions.create(
        model=vllm_server.model, messages=MESSAGES, max_tokens=12, temperature=0, extra_body=EXACT
    )
    check_chat(answer, vllm_server.model, 12)


def test_chat_completion_ends_within_max_tokens(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    answer = client.chat.completions.create(model=vllm_server.model, messages=MESSAGES, max_tokens=24, seed=7)
    choice = answer.choices[0]
    assert answer.usage is not None
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == 24
    else:
        assert 0 < answer.usage.completion_tokens <= 24


def test_chat_completion_streamed(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    stream = client.chat.completions.create(
        model=vllm_server.model,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    with stream:
        chunks = list(stream)
    check_chat_stream(chunks, vllm_server.model, 10)


def test_completion(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    answer = client.completions.create(
        model=vllm_server.model, prompt=PROMPT, max_tokens=9, temperature=0, extra_body=EXACT
    )
    check_completion(answer, vllm_server.model, 9)


def test_completion_with_several_choices(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    answer = client.completions.create(
        model=vllm_server.model, prompt=PROMPT, max_tokens=5, n=3, temperature=1.0, seed=1, extra_body=EXACT
    )
    check_completion(answer, vllm_server.model, 5, n=3)


def test_completion_streamed(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    stream = client.completions.create(
        model=vllm_server.model,
        prompt=PROMPT,
        max_tokens=7,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    with stream:
        chunks = list(stream)
    check_completion_stream(chunks, vllm_server.model, 7)


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)


def test_request_longer_than_the_context_is_rejected(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=5000)


async def test_async_chat_completion(vllm_server: VllmServer) -> None:
    async with async_client(vllm_server) as client:
        answer = await client.chat.completions.create(
            model=vllm_server.model, messages=MESSAGES, max_tokens=8, temperature=0, extra_body=EXACT
        )
    check_chat(answer, vllm_server.model, 8)


async def test_async_chat_completion_streamed(vllm_server: VllmServer) -> None:
    async with async_client(vllm_server) as client:
        stream = await client.chat.completions.create(
            model=vllm_server.model,
            messages=MESSAGES,
            max_tokens=11,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    check_chat_stream(chunks, vllm_server.model, 11)


async def test_async_completion(vllm_server: VllmServer) -> None:
    async with async_client(vllm_server) as client:
        answer = await client.completions.create(
            model=vllm_server.model, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=EXACT
        )
    check_completion(answer, vllm_server.model, 6)


async def test_async_completion_streamed(vllm_server: VllmServer) -> None:
    async with async_client(vllm_server) as client:
        stream = await client.completions.create(
            model=vllm_server.model,
            prompt=PROMPT,
            max_tokens=13,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    check_completion_stream(chunks, vllm_server.model, 13)


async def test_concurrent_streams_are_all_served(vllm_server: VllmServer) -> None:
    async def one(client: openai.AsyncOpenAI, max_tokens: int) -> list[openai.types.chat.ChatCompletionChunk]:
        stream = await client.chat.completions.create(
            model=vllm_server.model,
            messages=MESSAGES,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        async with stream:
            return [chunk async for chunk in stream]

    async with async_client(vllm_server) as client:
        results = await asyncio.gather(*(one(client, 5 + i) for i in range(6)))
    for i, chunks in enumerate(results):
        check_chat_stream(chunks, vllm_server.model, 5 + i)
