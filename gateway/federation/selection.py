"""Choosing among the endpoints that can serve a request, from what the tracker last saw of each."""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.federation.registry import Endpoint

# The order in which states are tried. ``unknown`` (not yet observed, or observed too long ago)
# comes right after ``hot``: a fresh gateway must route before its first observation arrives.
RANK = {"hot": 0, "unknown": 1, "starting": 2, "queued": 3, "cold": 4}
SKIPPED = frozenset({"offline", "maintenance"})


@dataclass(frozen=True, slots=True)
class Plan:
    """The endpoints to try in order, and the state of the first, which decides whether to hold or refuse."""

    endpoints: list[Endpoint]
    state: str
    skipped: list[Endpoint]


# How much cheaper (as a factor) the second of two drawn endpoints must be to be chosen over the first.
CLEARLY_CHEAPER = 1.25


def load(endpoint: Endpoint) -> int:
    """Requests the endpoint is busy with: the gateway's own in flight (exact, live) plus what others had
    running and waiting there when the backend last reported."""
    return endpoint.in_flight + endpoint.others_load


def cost(endpoint: Endpoint, now: float) -> float:
    """The expected wait for one more request: the requests ahead of it times the endpoint's recent time per
    token, faded since it was measured. An endpoint with no time yet costs nothing, so that it gets tried."""
    return (endpoint.in_flight + endpoint.others_load + 1) * endpoint.recent_latency(now)


def plan(
    candidates: Sequence[Endpoint],
    model: str | None = None,
    rng: random.Random | None = None,
    limit: int | None = None,
    round_robin: bool = False,
) -> Plan:
    """Order ``candidates``: hot first (the cheaper of two random picks leads, the rest by cost), then
    unknown, starting, queued (soonest start first) and cold; offline, maintenance and open circuit breakers
    are left out. With ``limit``, only the first ``limit`` endpoints are ordered and returned.

    This runs on every request, so the loop reads attributes instead of calling methods.
    """
    wall, now = time.time(), time.monotonic()
    hot: list[Endpoint] = []
    later: list[tuple[int, float, int, Endpoint]] = []
    skipped: list[Endpoint] = []
    for index, endpoint in enumerate(candidates):
        seen = endpoint.availability
        state = seen.state if wall - seen.observed_at <= endpoint.stale_after else "unknown"
        if state == "hot" and seen.cold_models and model in seen.cold_models:
            state = "cold"
        if endpoint.maintenance is not None or state in SKIPPED or now < endpoint.down_until:
            skipped.append(endpoint)
        elif state == "hot":
            hot.append(endpoint)
        elif state == "queued":
            later.append((RANK[state], seen.estimated_start or 0.0, index, endpoint))
        else:
            later.append((RANK[state], endpoint.in_flight + endpoint.others_load, index, endpoint))
    limit = limit or len(candidates)
    ordered: list[Endpoint] = []
    if round_robin and hot:
        # Kept for comparison and for backends whose load the gateway cannot see: each hot endpoint in turn.
        turn = next(_turns) % len(hot)
        ordered += hot[turn:] + hot[:turn]
    elif len(hot) >= 2:
        # Power of two choices: of two random hot endpoints, the one where a request should finish sooner
        # (requests ahead times recent request time) goes first. Always taking the cheapest of all would
        # send a burst of simultaneous requests to one endpoint before its count moves.
        first, second = (rng or _rng).sample(hot, 2)
        # The figures are estimates: only a clearly cheaper second endpoint displaces the first drawn, so that
        # equal endpoints share the traffic whatever noise their timings carry.
        pick = second if cost(second, now) * CLEARLY_CHEAPER < cost(first, now) else first
        ordered.append(pick)
        if limit > 1:
            rest = [endpoint for endpoint in hot if endpoint is not pick]
            ordered += heapq.nsmallest(limit - 1, rest, key=lambda endpoint: cost(endpoint, now))
    else:
        ordered += hot
    if len(ordered) < limit and later:
        ordered += [entry[3] for entry in heapq.nsmallest(limit - len(ordered), later)]
    if not ordered:
        return Plan([], "offline", skipped)
    return Plan(ordered[:limit], "hot" if hot else ordered[0].state(wall, model), skipped)


_rng = random.Random()
_turns = itertools.count()


NOT_HOT = frozenset({"starting", "queued", "cold"})


def explain(endpoint: Endpoint, model: str | None = None) -> str:
    """The endpoint's state (for ``model``) in words, for a 503 that tells the caller what is happening."""
    state = endpoint.state(time.time(), model)
    where = f"on cluster '{endpoint.cluster}'"
    if state == "queued":
        start = endpoint.availability.estimated_start
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)) if start else "unknown"
        return f"queued {where}, estimated start {when}"
    if state == "starting":
        return f"starting {where}"
    if state == "cold":
        return f"not running {where}"
    return f"{state} {where}"


def describe(endpoints: Sequence[Endpoint]) -> str:
    """Why each of ``endpoints`` was left out, in one line."""
    wall, now = time.time(), time.monotonic()
    reasons = []
    for endpoint in endpoints:
        if not endpoint.is_up(now):
            reasons.append(f"{endpoint.id}: failing, paused")
        else:
            detail = endpoint.availability.detail
            reasons.append(f"{endpoint.id}: {endpoint.state(wall)}" + (f" ({detail})" if detail else ""))
    return "; ".join(reasons) or "no endpoint"
