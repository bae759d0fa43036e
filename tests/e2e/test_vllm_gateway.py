"""The usage guide's requests through the gateway to a real vLLM on the CPU."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, api_url

from .conftest import VllmServer
from .test_vllm_direct import EXACT, MESSAGES, PROMPT, check_chat, check_chat_stream, check_completion


def test_chat_whole(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    answer = client.chat.completions.create(
        model=vllm_server.model,
        messages=MESSAGES,
        max_tokens=12,  # type: ignore[arg-type]
        extra_body=EXACT,
    )
    check_chat(answer, vllm_server.model, 12)


def test_chat_streamed_keeps_the_usage_chunk(client: openai.OpenAI, vllm_server: VllmServer) -> None:
    stream = client.chat.completions.create(
        model=vllm_server.model,
        messages=MESSAGES,
        max_tokens=10,
        stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    check_chat_stream(list(stream), vllm_server.model, 10)


def test_cluster_route_completions(front: ModelServer, vllm_server: VllmServer) -> None:
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{front.port}/resource_server/local/vllm/v1", api_key=TOKEN, max_retries=0
    ) as client:
        answer = client.completions.create(model=vllm_server.model, prompt=PROMPT, max_tokens=8, extra_body=EXACT)
    check_completion(answer, vllm_server.model, 8)


def test_async_streams_in_parallel(front: ModelServer, vllm_server: VllmServer) -> None:
    async def one(client: openai.AsyncOpenAI) -> int:
        stream = await client.completions.create(
            model=vllm_server.model, prompt=PROMPT, max_tokens=6, stream=True, extra_body=EXACT
        )
        pieces = [chunk async for chunk in stream if chunk.choices and chunk.choices[0].text]
        return len(pieces)

    async def run() -> list[int]:
        async with openai.AsyncOpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0) as client:
            return await asyncio.gather(*(one(client) for _ in range(4)))

    assert all(0 < count <= 6 for count in asyncio.run(run()))


def test_vllms_own_400_reaches_the_client_in_the_gateway_shape(front: ModelServer, vllm_server: VllmServer) -> None:
    response = httpx.post(
        f"{api_url(front)}/completions",
        headers={"authorization": f"Bearer {TOKEN}"},
        json={"model": vllm_server.model, "prompt": PROMPT, "max_tokens": 5000},
        timeout=60,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]


def test_unknown_model_is_404_before_reaching_vllm(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not/served", messages=MESSAGES)  # type: ignore[arg-type]
