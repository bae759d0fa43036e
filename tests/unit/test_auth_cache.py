"""The verdict cache: expiry, size bound, the Redis tier and single flight."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from gateway.auth.base import Identity
from gateway.auth.cache import RedisVerdictCache, Refusal, SingleFlight, Verdict, VerdictCache, token_key
from gateway.errors import AuthenticationFailed, PermissionDenied

JANE = Identity(
    subject="s-1",
    username="jdoe@anl.gov",
    name="Jane",
    idp_domain="anl.gov",
    identity_set=("s-1", "s-2"),
    groups=frozenset({"g-1", "g-2"}),
    client_id="app",
    provider="globus",
)


def test_key_is_a_digest_not_the_token() -> None:
    key = token_key("AgSecretToken")
    assert "Secret" not in key and len(key) == 64 and key == token_key("AgSecretToken")


def test_entries_expire() -> None:
    cache = VerdictCache()
    cache.put("fresh", Verdict(time.time() + 60, identity=JANE))
    cache.put("stale", Verdict(time.time() - 1, identity=JANE))
    assert cache.get("fresh") is not None and cache.get("stale") is None and cache.get("absent") is None


def test_size_is_bounded_dropping_expired_then_oldest() -> None:
    cache = VerdictCache(max_entries=3)
    cache.put("old", Verdict(time.time() + 60, identity=JANE))
    cache.put("expired", Verdict(time.time() - 1, identity=JANE))
    cache.put("b", Verdict(time.time() + 60, identity=JANE))
    cache.put("c", Verdict(time.time() + 60, identity=JANE))
    assert [key for key in ("old", "b", "c") if cache.get(key)] == ["old", "b", "c"]
    cache.put("d", Verdict(time.time() + 60, identity=JANE))
    assert cache.get("old") is None and all(cache.get(key) for key in ("b", "c", "d"))


def test_verdicts_survive_encoding() -> None:
    allowed = Verdict(123.5, identity=JANE)
    refused = Verdict(1.0, refusal=Refusal(403, "group_required", "not a member"))
    assert Verdict.decode(allowed.encode()) == allowed and Verdict.decode(refused.encode()) == refused


def test_each_refusal_raises_a_fresh_error() -> None:
    verdict = Verdict(time.time() + 5, refusal=Refusal(401, "invalid_token", "no"))
    errors = []
    for _ in range(2):
        with pytest.raises(AuthenticationFailed) as raised:
            verdict.outcome()
        errors.append(raised.value)
    assert errors[0] is not errors[1] and errors[0].code == "invalid_token"
    with pytest.raises(PermissionDenied):
        Verdict(0, refusal=Refusal(403, "x", "y")).outcome()


async def test_single_flight_shares_one_look_up() -> None:
    flights = SingleFlight()
    calls = 0

    async def look_up() -> Verdict:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return Verdict(time.time() + 5, identity=JANE)

    results = await asyncio.gather(*(asyncio.shield(flights.join("k", look_up)) for _ in range(50)))
    assert calls == 1 and all(result.identity == JANE for result in results) and len(flights) == 0


async def test_a_caller_giving_up_does_not_cancel_the_others() -> None:
    flights = SingleFlight()

    async def look_up() -> Verdict:
        await asyncio.sleep(0.1)
        return Verdict(time.time() + 5, identity=JANE)

    impatient = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(flights.join("k", look_up)), 0.01))
    patient = asyncio.shield(flights.join("k", look_up))
    with pytest.raises(TimeoutError):
        await impatient
    assert (await patient).identity == JANE


@pytest.fixture
def prefix() -> str:
    return f"test-auth-{os.urandom(6).hex()}:"


async def test_replicas_share_verdicts_through_redis(prefix: str) -> None:
    first = RedisVerdictCache.from_url("redis://127.0.0.1:6379/0", prefix)
    second = RedisVerdictCache.from_url("redis://127.0.0.1:6379/0", prefix)
    try:
        await first.store("k", Verdict(time.time() + 2, identity=JANE))
        assert second.get("k") is None
        shared = await second.load("k")
        assert shared is not None and shared.identity == JANE
        assert second.get("k") == shared
        ttl = await second._redis.pttl(prefix + "k")
        assert 0 < ttl <= 2000
        keys = [key async for key in second._redis.scan_iter(match=prefix + "*")]
        assert keys == [(prefix + "k").encode()]
    finally:
        await first.close()
        await second.close()


async def test_unreachable_redis_falls_back_to_this_process(caplog: pytest.LogCaptureFixture) -> None:
    from compute_functions.model_server import free_port

    cache = RedisVerdictCache.from_url(f"redis://127.0.0.1:{free_port()}/0", "p:", timeout=0.2)
    try:
        await cache.store("k", Verdict(time.time() + 5, identity=JANE))
        assert cache.get("k") is not None
        assert await cache.load("other") is None
        assert sum("Redis" in record.message for record in caplog.records) == 1
    finally:
        await cache.close()
