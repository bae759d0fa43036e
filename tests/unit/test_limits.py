"""Rate limits counted in the process: what applies to whom, reservations, refusals and settlement."""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.accounting.record import RequestRecord, Reserved
from gateway.config import LimitSettings
from gateway.errors import RateLimited
from gateway.limits.base import requested_tokens, rules_for
from gateway.limits.memory import MemoryRateLimiter

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 10}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(settings: dict[str, object]) -> tuple[MemoryRateLimiter, Clock]:
    clock = Clock()
    return MemoryRateLimiter(LimitSettings.model_validate(settings), clock=clock), clock


def test_a_user_gets_the_defaults_unless_named_and_the_models_rules_on_top() -> None:
    settings = LimitSettings.model_validate(
        {
            "defaults": {"requests_per_second": 5},
            "users": {"alice": {"concurrent_requests": 2}},
            "models": {"m": {"total": {"tokens_per_minute": 1000}, "per_user": {"requests_per_second": 1}}},
        }
    )
    assert [rule.setting for rule in rules_for(settings, "bob", "other")] == ["defaults.requests_per_second"]
    assert [rule.setting for rule in rules_for(settings, "alice", "m")] == [
        "users.alice.concurrent_requests",
        "models.m.total.tokens_per_minute",
        "models.m.per_user.requests_per_second",
    ]
    assert {rule.key for rule in rules_for(settings, "bob", "m")} == {"u:bob:rps", "m:m:tpm", "um:bob:m:rps"}


def test_no_limits_configured_means_nothing_to_reserve() -> None:
    assert not MemoryRateLimiter(LimitSettings()).enabled
    assert MemoryRateLimiter(LimitSettings.model_validate({"users": {"a": {"burst": 3}}})).enabled is False


async def test_requests_per_second_allows_a_burst_then_refuses_with_retry_after() -> None:
    limits, clock = limiter({"defaults": {"requests_per_second": 2}})
    for _ in range(2):
        assert await limits.reserve("bob", "m", "chat/completions", CHAT) is not None
    with pytest.raises(RateLimited) as refused:
        await limits.reserve("bob", "m", "chat/completions", CHAT)
    assert refused.value.status == 429
    assert refused.value.headers["retry-after"] == "1"
    assert "limits.defaults.requests_per_second" in refused.value.message
    assert "user 'bob' may send 2 requests per second" in refused.value.message
    assert await limits.reserve("alice", "m", "chat/completions", CHAT) is not None
    clock.now += 0.5
    assert await limits.reserve("bob", "m", "chat/completions", CHAT) is not None
    assert limits.refusals == {"defaults.requests_per_second": 1}


async def test_a_refusal_takes_nothing_from_the_other_rules() -> None:
    limits, _ = limiter(
        {"defaults": {"requests_per_second": 1}, "models": {"m": {"total": {"requests_per_second": 1}}}}
    )
    await limits.reserve("bob", "m", "chat/completions", CHAT)
    with pytest.raises(RateLimited, match=re.escape("models.m.total.requests_per_second")):
        await limits.reserve("alice", "m", "chat/completions", CHAT)
    # Alice's own bucket was not charged by the refused request.
    assert await limits.reserve("alice", "other", "chat/completions", CHAT) is not None


async def test_tokens_are_estimated_then_settled_with_the_real_usage() -> None:
    limits, clock = limiter({"models": {"m": {"per_user": {"tokens_per_minute": 60}}}})
    estimate = requested_tokens("chat/completions", CHAT, 256)
    assert estimate == 40 // 4 + 1 + 10
    first = await limits.reserve("bob", "m", "chat/completions", CHAT)
    second = await limits.reserve("bob", "m", "chat/completions", CHAT)
    assert first is not None and second is not None
    with pytest.raises(RateLimited, match="tokens_per_minute") as refused:
        await limits.reserve("bob", "m", "chat/completions", CHAT)
    # 60 - 2 * 21 = 18 left, 21 needed, refilled at one token a second.
    assert refused.value.headers["retry-after"] == "3"
    limits.settle(first, 5)
    limits.settle(second, 5)
    clock.now += 0.001
    assert await limits.reserve("bob", "m", "chat/completions", CHAT) is not None


async def test_a_request_larger_than_the_bucket_passes_when_it_is_full() -> None:
    limits, _ = limiter({"defaults": {"tokens_per_minute": 10}})
    assert await limits.reserve("bob", "m", "chat/completions", {**CHAT, "max_tokens": 1000}) is not None
    with pytest.raises(RateLimited):
        await limits.reserve("bob", "m", "chat/completions", CHAT)


async def test_unknown_usage_keeps_the_estimate_and_a_failed_request_gives_it_back() -> None:
    limits, _ = limiter({"defaults": {"tokens_per_minute": 42}})
    held = await limits.reserve("bob", "m", "chat/completions", CHAT)
    assert held is not None
    limits.settle(held, None)
    refunded = await limits.reserve("bob", "m", "chat/completions", CHAT)
    assert refunded is not None
    limits.settle(refunded, 0)
    with pytest.raises(RateLimited):
        await limits.reserve("bob", "m", "chat/completions", {**CHAT, "max_tokens": 30})


async def test_concurrent_requests_are_held_until_settled() -> None:
    limits, _ = limiter({"users": {"bob": {"concurrent_requests": 1}}})
    held = await limits.reserve("bob", "m", "chat/completions", CHAT)
    assert held is not None
    with pytest.raises(RateLimited, match="may have 1 requests running at once") as refused:
        await limits.reserve("bob", "m", "completions", {"prompt": "x"})
    assert "limits.users.bob.concurrent_requests" in refused.value.message
    limits.settle(held, 3)
    assert await limits.reserve("bob", "m", "chat/completions", CHAT) is not None


def reserved(limits: MemoryRateLimiter, record: RequestRecord | None = None) -> Reserved:
    record = record or RequestRecord("POST", "/resource_server/v1/chat/completions", None)
    return Reserved(limits, record, "bob", "m", "chat/completions", CHAT)


async def test_a_reservation_over_a_block_is_settled_when_it_raises_or_is_cancelled() -> None:
    limits, _ = limiter({"users": {"bob": {"concurrent_requests": 1}}})
    with pytest.raises(ConnectionError):
        async with reserved(limits):
            with pytest.raises(RateLimited):
                await limits.reserve("bob", "m", "chat/completions", CHAT)
            raise ConnectionError("no backend answered")
    entered = asyncio.Event()

    async def waiting_on_the_backend() -> None:
        async with reserved(limits):
            entered.set()
            await asyncio.sleep(3600)

    request = asyncio.create_task(waiting_on_the_backend())
    await entered.wait()
    with pytest.raises(RateLimited):
        await limits.reserve("bob", "m", "chat/completions", CHAT)
    request.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await request
    assert await limits.reserve("bob", "m", "chat/completions", CHAT) is not None


async def test_a_reservation_keeps_the_usage_or_the_estimate_once_the_answer_started() -> None:
    limits, _ = limiter({"defaults": {"tokens_per_minute": 63}})  # three estimates of 21
    with pytest.raises(ConnectionError):
        async with reserved(limits):
            raise ConnectionError("failed before the answer started: all 21 come back")
    with pytest.raises(ConnectionError):
        async with reserved(limits) as cut_off:
            cut_off.started = True
            raise ConnectionError("the stream broke off: the backend did work it did not report, 21 are kept")
    record = RequestRecord("POST", "/resource_server/v1/chat/completions", None)
    async with reserved(limits, record):
        record.prompt_tokens, record.completion_tokens = 11, 5  # 16 used: 5 of its 21 come back
    with pytest.raises(RateLimited):
        await limits.reserve(
            "bob", "m", "chat/completions", {**CHAT, "max_tokens": 16}
        )  # 63 - 21 - 16 = 26 left, 27 asked
    assert await limits.reserve("bob", "m", "chat/completions", {**CHAT, "max_tokens": 15}) is not None


@pytest.mark.parametrize(
    ("op", "body", "tokens"),
    [
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]},
            3 + 7,
        ),
        ("completions", {"prompt": ["abcd", "efgh"], "max_tokens": 5, "n": 2}, 3 + 10),
        ("completions", {"prompt": [1, 2, 3], "max_completion_tokens": 1}, 4 + 1),
        ("embeddings", {"input": "abcdefgh"}, 3),
        ("responses", {"input": "abcdefgh", "instructions": "abcd", "max_output_tokens": 5}, 4 + 5),
        ("responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}]}, 2 + 7),
        ("messages", {"system": "abcd", "messages": [{"role": "user", "content": "abcd"}], "max_tokens": 2}, 3 + 2),
        ("rerank", {"model": "a-long-model-name", "query": "abcd", "documents": ["abcd", {"text": "abcd"}]}, 4),
        ("tokenize", {"model": "m", "prompt": "abcdefgh"}, 3),
    ],
)
def test_requested_tokens(op: str, body: dict[str, object], tokens: int) -> None:
    assert requested_tokens(op, body, 7) == tokens
