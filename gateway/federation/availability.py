"""What is known of an endpoint's readiness to serve, and when it was learnt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

State = Literal["hot", "starting", "queued", "cold", "offline", "maintenance", "unknown"]


@dataclass(frozen=True)
class Availability:
    """One observation of an endpoint.

    ``state``: ``hot`` (a model server answers), ``starting`` (its job runs, the
    model is loading), ``queued`` (its job waits in the scheduler), ``cold``
    (reachable, nothing running), ``offline`` (unreachable), ``maintenance``,
    or ``unknown`` (reachable, but it did not say more). ``running`` and
    ``waiting`` count requests when the backend reports them. ``estimated_start``
    (epoch seconds) is the scheduler's guess for a queued job, and ``jobs`` the
    scheduler's entries for the endpoint's model jobs, when the transport knows them.
    ``cold_models`` are models of a serving endpoint that are not loaded: for
    them the endpoint is ``cold`` whatever its own state.
    """

    state: State
    observed_at: float = field(default_factory=time.time)
    detail: str = ""
    running: int | None = None
    waiting: int | None = None
    estimated_start: float | None = None
    jobs: tuple[dict[str, object], ...] = ()
    cold_models: frozenset[str] = frozenset()
    # The model server says it is the simulator (its model list marks its models): answers are synthetic.
    simulated: bool = False

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.observed_at
