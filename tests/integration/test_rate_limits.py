"""Rate limits through a real gateway: refusals as the OpenAI SDK sees them, and one limit held by two replicas."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from compute_functions.model_server import ModelServer
from gateway.config import LimitSettings
from gateway.errors import RateLimited
from gateway.limits.redis import RedisRateLimiter
from tests.support import TOKEN, api_url, direct_config, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"
LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
SMALL = "tiny/model"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--tpot", "0.01", models=(MODEL, LLAMA, SMALL)) as server:
        yield server


@pytest.fixture(scope="module")
def limited(backend: ModelServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    config = direct_config(endpoint(backend.base_url, [MODEL, LLAMA, SMALL]))
    config["limits"] = {
        "models": {
            MODEL: {"per_user": {"requests_per_second": 0.5, "burst": 2}},
            LLAMA: {"total": {"concurrent_requests": 1}},
            SMALL: {"per_user": {"tokens_per_minute": 120}},
        },
    }
    with gateway(config, tmp_path_factory.mktemp("limits")) as server:
        yield server


@pytest.fixture
def client(limited: ModelServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url(limited), api_key=TOKEN, max_retries=0)


def test_requests_per_second_refusal_is_a_429_the_sdk_understands(client: openai.OpenAI) -> None:
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    response = refused.value.response
    assert response.headers["retry-after"] == "2"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert f"limits.models.{MODEL}.per_user.requests_per_second" in error["message"]
    assert "may send 0.5 requests per second" in error["message"]
    assert response.headers["x-request-id"]


def test_a_models_concurrency_limit_holds_until_the_stream_ends(limited: ModelServer, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=LLAMA, messages=QUESTION, max_tokens=40, stream=True)  # type: ignore[arg-type]
    first = next(iter(stream))
    assert first.choices
    with pytest.raises(openai.RateLimitError, match=re.escape(f"limits.models.{LLAMA}.total.concurrent_requests")):
        client.chat.completions.create(model=LLAMA, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]
    assert sum(1 for _ in stream) > 0
    assert client.chat.completions.create(model=LLAMA, messages=QUESTION, max_tokens=1)  # type: ignore[arg-type]


def test_tokens_per_minute_count_the_estimate_then_the_real_usage(client: openai.OpenAI) -> None:
    client.chat.completions.create(model=SMALL, messages=QUESTION, max_tokens=100)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError, match="tokens_per_minute") as refused:
        client.chat.completions.create(model=SMALL, messages=QUESTION, max_tokens=100)  # type: ignore[arg-type]
    assert int(refused.value.response.headers["retry-after"]) >= 1


def test_refusals_are_counted_by_limit(limited: ModelServer) -> None:
    text = httpx.get(f"http://127.0.0.1:{limited.port}/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    refused = {sample.labels["limit"]: sample.value for sample in families["gateway_rate_limited"].samples}
    assert refused.get(f"models.{MODEL}.per_user.requests_per_second", 0) >= 1


# --- shared through Redis --------------------------------------------------------------------------------------


async def test_the_redis_limiter_reserves_refuses_and_settles() -> None:
    prefix = f"test-limits-{os.urandom(4).hex()}:"
    settings = LimitSettings.model_validate(
        {
            "redis_prefix": prefix,
            "defaults": {"concurrent_requests": 1, "tokens_per_minute": 150},
        }
    )
    limits = RedisRateLimiter(settings, REDIS)
    await limits.start()
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 50}
    try:
        held = await limits.reserve("bob", "m", "chat/completions", body)
        assert held is not None
        with pytest.raises(RateLimited, match=re.escape("defaults.concurrent_requests")):
            await limits.reserve("bob", "m", "chat/completions", body)
        limits.settle(held, 11)
        for _ in range(50):
            await asyncio.sleep(0.01)
            try:
                second = await limits.reserve("bob", "m", "chat/completions", body)
                break
            except RateLimited:
                continue
        else:
            raise AssertionError("the settled slot was not freed")
        assert second is not None
        # Kept at its estimate of 61: 150 - 61 + 50 - 61 leaves 78, short of the next estimate of 111.
        limits.settle(second, None)
        await asyncio.sleep(0.05)
        with pytest.raises(RateLimited, match=re.escape("defaults.tokens_per_minute")):
            await limits.reserve("bob", "m", "chat/completions", {**body, "max_tokens": 100})
        assert await limits.check() is None
    finally:
        await limits.close()
        cleanup = RedisRateLimiter(settings, REDIS)
        keys = await cleanup.client.keys(prefix + "*")
        if keys:
            await cleanup.client.delete(*keys)
        await cleanup.close()


def test_two_gateways_sharing_redis_hold_a_user_to_one_limit(backend: ModelServer, tmp_path: Path) -> None:
    rate = 20.0
    config = direct_config(endpoint(backend.base_url, [MODEL]))
    config["limits"] = {
        "redis_url": REDIS,
        "redis_prefix": f"test-limits-{os.urandom(4).hex()}:",
        "users": {"dev-user": {"requests_per_second": rate}},
    }
    config["database"] = {"flush_interval": 0.2}
    homes = [tmp_path / "a", tmp_path / "b"]
    with (
        gateway(config, tmp_path, env={"INFERENCE_GATEWAY_STATE_DIR": str(homes[0])}) as first,
        gateway(config, tmp_path, env={"INFERENCE_GATEWAY_STATE_DIR": str(homes[1])}) as second,
    ):
        urls = [f"{api_url(server)}/chat/completions" for server in (first, second)]
        statuses: list[int] = []
        stop = threading.Event()

        def client(index: int) -> None:
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}
            with httpx.Client(headers=AUTH, timeout=30) as session:
                calls = 0
                while not stop.is_set():
                    statuses.append(session.post(urls[(index + calls) % 2], json=body).status_code)
                    calls += 1

        with ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(client, index) for index in range(6)]
            time.sleep(4)
            stop.set()
            for running in clients:
                running.result()
    assert set(statuses) == {200, 429}
    # When the gateways let requests in, from their own usage logs: a client's clock would add each answer's
    # latency, which on a loaded machine is a fair part of a second.
    admitted = sorted(
        row[0]
        for home in homes
        for row in sqlite3.connect(home / "gateway.db").execute("SELECT created_at FROM usage_log WHERE status = 200")
    )
    assert len(admitted) == statuses.count(200) and statuses.count(429) > len(admitted)
    # A full bucket (one second's worth) at the start, then the rate for as long as requests were let in.
    expected = rate + rate * (admitted[-1] - admitted[0])
    assert abs(len(admitted) - expected) <= 0.05 * expected, (len(admitted), expected)


def test_the_slots_of_a_replica_that_died_are_free_again_soon_after(backend: ModelServer, tmp_path: Path) -> None:
    lease = 2.0
    config = direct_config(endpoint(backend.base_url, [MODEL]))
    config["limits"] = {
        "redis_url": REDIS,
        "redis_prefix": f"test-limits-{os.urandom(4).hex()}:",
        "concurrency_lease_seconds": lease,
        "users": {"dev-user": {"concurrent_requests": 2}},
    }
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4000, "stream": True}
    with gateway(config, tmp_path, env={"INFERENCE_GATEWAY_STATE_DIR": str(tmp_path / "b")}) as survivor:
        dying = gateway(config, tmp_path, env={"INFERENCE_GATEWAY_STATE_DIR": str(tmp_path / "a")})
        holder = dying.__enter__()
        try:
            assert holder.process is not None
            # Two long streams on the replica that will die hold both of the user's slots.
            streams = [
                httpx.stream("POST", f"{api_url(holder)}/chat/completions", headers=AUTH, json=body, timeout=60)
                for _ in range(2)
            ]
            for stream in streams:
                assert stream.__enter__().status_code == 200
            short = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}
            url = f"{api_url(survivor)}/chat/completions"
            refused = httpx.post(url, headers=AUTH, json=short, timeout=30)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            # Longer than two leases: the living holder renews them, and the slots stay taken.
            time.sleep(2.5 * lease)
            assert httpx.post(url, headers=AUTH, json=short, timeout=30).status_code == 429
            os.kill(holder.process.pid, 9)
            for stream in streams:
                with contextlib.suppress(httpx.HTTPError):
                    stream.__exit__(None, None, None)
        finally:
            dying.__exit__(None, None, None)
        # Within about one lease the survivor lets the user in again (it took 15 minutes before leases).
        deadline = time.monotonic() + 30
        while (status := httpx.post(url, headers=AUTH, json=short, timeout=30).status_code) == 429:
            assert time.monotonic() < deadline, "the dead replica's slots were never freed"
            time.sleep(0.2)
        assert status == 200
