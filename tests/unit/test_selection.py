"""Choosing among endpoints from their observed state, load and breaker."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest

from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint
from gateway.federation.selection import cost, describe, explain, load, plan


def make(name: str, state: str = "hot", **seen: object) -> Endpoint:
    endpoint = Endpoint(
        cluster=name, framework="vllm", models=("m",), transport="direct", kind="vllm", base_url=f"http://{name}/v1"
    )
    endpoint.observe(Availability(state, **seen))  # type: ignore[arg-type]
    return endpoint


def ids(endpoints: list[Endpoint]) -> list[str]:
    return [endpoint.cluster for endpoint in endpoints]


def test_states_are_tried_hot_unknown_starting_queued_cold_and_the_rest_left_out() -> None:
    now = time.time()
    candidates = [
        make("cold", "cold"),
        make("queued-late", "queued", estimated_start=now + 600),
        make("offline", "offline"),
        make("starting", "starting"),
        make("hot", "hot"),
        make("queued-soon", "queued", estimated_start=now + 60),
        make("unknown", "unknown"),
        make("maintenance", "hot"),
    ]
    candidates[-1].maintenance = "disk swap"
    decided = plan(candidates)
    assert ids(decided.endpoints) == ["hot", "unknown", "starting", "queued-soon", "queued-late", "cold"]
    assert decided.state == "hot"
    assert sorted(ids(decided.skipped)) == ["maintenance", "offline"]


def test_nothing_usable_gives_an_empty_plan_that_says_why() -> None:
    down = make("a", "offline", detail="connection refused")
    decided = plan([down])
    assert decided.endpoints == [] and decided.state == "offline"
    assert describe(decided.skipped) == "a/vllm: offline (connection refused)"


def test_stale_observation_becomes_unknown() -> None:
    endpoint = make("a", "offline", observed_at=time.time() - 120)
    assert endpoint.state(time.time()) == "unknown"
    assert ids(plan([endpoint]).endpoints) == ["a"]


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    busy, idle = make("busy"), make("idle")
    busy.record_success(0.1)
    idle.record_success(0.1)
    busy.in_flight = 10
    firsts = Counter(ids(plan([busy, idle], random.Random(seed)).endpoints)[0] for seed in range(200))
    assert firsts == {"idle": 200}


def test_equal_load_spreads_evenly() -> None:
    endpoints = [make(name) for name in "abc"]
    rng = random.Random(1)
    firsts = Counter(plan(endpoints, rng).endpoints[0].cluster for _ in range(3000))
    assert all(900 < count < 1100 for count in firsts.values()), firsts


def test_a_slower_endpoint_costs_more_for_the_same_load() -> None:
    fast, slow = make("fast"), make("slow")
    fast.record_success(0.1)
    slow.record_success(0.2)
    now = fast.latency_at = slow.latency_at
    fast.in_flight = slow.in_flight = 2
    assert cost(slow, now) == 2 * cost(fast, now)
    fast.in_flight = 8  # now nine requests at 0.1 s against three at 0.2 s
    assert all(ids(plan([fast, slow], random.Random(seed)).endpoints)[0] == "slow" for seed in range(50))


def test_endpoints_whose_costs_differ_by_noise_share_the_traffic() -> None:
    a, b = make("a"), make("b")
    a.record_success(0.100)
    b.record_success(0.115)
    rng = random.Random(5)
    firsts = Counter(ids(plan([a, b], rng).endpoints)[0] for _ in range(2000))
    assert 900 < firsts["a"] < 1100, firsts


def test_untried_endpoint_is_tried_first() -> None:
    tried, new = make("tried"), make("new")
    tried.record_success(0.05)
    assert cost(new, time.monotonic()) == 0 and ids(plan([tried, new], random.Random(0)).endpoints)[0] == "new"


def test_request_time_is_a_moving_average_per_token() -> None:
    endpoint = make("a")
    endpoint.record_success(1.0)
    endpoint.record_success(2.0)
    assert endpoint.latency == pytest.approx(1.2)
    endpoint.record_success(20.0, tokens=1999)
    assert endpoint.latency == pytest.approx(1.2 + 0.2 * (0.01 - 1.2))


def test_a_request_that_asked_for_many_tokens_does_not_make_its_endpoint_look_slow() -> None:
    # Two equal endpoints at 10 ms a token: one answered 2,000 tokens in 20 s, the other 16 tokens in 0.17 s.
    long_one, short_ones = make("long"), make("short")
    long_one.record_success(20.0, tokens=1999)
    for _ in range(50):
        short_ones.record_success(0.17, tokens=16)
    rng = random.Random(3)
    firsts: Counter[str] = Counter()
    for _ in range(260):
        # Ten requests at once, all answered (16 tokens in 0.17 s wherever they went) before the next ten.
        chosen = []
        for _ in range(10):
            endpoint = plan([long_one, short_ones], rng).endpoints[0]
            endpoint.in_flight += 1
            chosen.append(endpoint)
        for endpoint in chosen:
            endpoint.in_flight -= 1
            endpoint.record_success(0.17, tokens=16)
            firsts[endpoint.cluster] += 1
    assert firsts["long"] > 1000 and firsts["short"] > 1000, firsts


def test_an_endpoint_passed_over_as_slow_gets_a_request_again_after_a_while() -> None:
    slow, fast = make("slow"), make("fast")
    slow.record_success(1.0, tokens=9)  # ten times slower a token
    fast.record_success(0.1, tokens=9)
    assert all(ids(plan([slow, fast], random.Random(seed)).endpoints)[0] == "fast" for seed in range(100))
    # Ten seconds (five half-lives) without a request: its figure has faded below the busy endpoint's.
    slow.latency_at -= 10.0
    assert ids(plan([slow, fast], random.Random(0)).endpoints)[0] == "slow"


def test_load_counts_others_reported_by_the_backend_but_not_our_own_twice() -> None:
    endpoint = make("a")
    endpoint.in_flight = 3
    endpoint.observe(Availability("hot", running=5, waiting=2))  # 3 of those 7 are ours
    assert load(endpoint) == 3 + 4
    endpoint.in_flight = 1
    assert load(endpoint) == 1 + 4


def test_unreachable_endpoint_is_left_out_until_seen_serving_again() -> None:
    endpoint, other = make("a"), make("b")
    endpoint.record_failure(unreachable=True)
    assert ids(plan([endpoint, other]).endpoints) == ["b"]
    endpoint.observe(Availability("hot"))
    assert sorted(ids(plan([endpoint, other]).endpoints)) == ["a", "b"]


def test_breaker_opens_after_repeated_failures_and_success_resets_the_count() -> None:
    endpoint = make("a")
    endpoint.record_failure()
    endpoint.record_failure()
    endpoint.record_success()
    endpoint.record_failure()
    assert ids(plan([endpoint]).endpoints) == ["a"]
    endpoint.record_failure()
    endpoint.record_failure()
    assert plan([endpoint]).endpoints == []
    assert "failing" in describe([endpoint])


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ("queued", "queued on cluster 'a', estimated start 2026-"),
        ("starting", "starting on cluster 'a'"),
        ("cold", "not running on cluster 'a'"),
    ],
)
def test_explain_names_the_state_and_cluster(state: str, words: str) -> None:
    endpoint = make("a", state, estimated_start=time.mktime((2026, 12, 1, 9, 30, 0, 0, 0, 0)))
    assert explain(endpoint).startswith(words)


async def test_a_request_counts_in_flight_until_its_block_ends_however_it_ends() -> None:
    endpoint = make("a")
    with endpoint.serving():
        assert endpoint.in_flight == 1
    with pytest.raises(ConnectionError), endpoint.serving():
        raise ConnectionError("the backend went away")
    assert endpoint.in_flight == 0

    entered = asyncio.Event()

    async def waiting_on_the_backend() -> None:
        with endpoint.serving():
            entered.set()
            await asyncio.sleep(3600)

    request = asyncio.create_task(waiting_on_the_backend())
    await entered.wait()
    assert endpoint.in_flight == 1
    request.cancel()  # the client left
    with pytest.raises(asyncio.CancelledError):
        await request
    assert endpoint.in_flight == 0
