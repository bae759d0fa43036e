"""What the request path does with the plan: a model only queued, starting or cold somewhere."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.api.inference import _route
from gateway.config import FederationSettings
from gateway.errors import ServiceUnavailable
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint


class Starts:
    """Stands in for the runtime: the federation settings, and a record of the models it was asked to start."""

    def __init__(self, **federation: Any) -> None:
        self.config = SimpleNamespace(federation=FederationSettings(**federation))
        self.started: list[tuple[str, str]] = []

    def warm_up(self, endpoint: Endpoint, backend_model: str) -> None:
        self.started.append((endpoint.id, backend_model))


def make(cluster: str, state: str, **seen: Any) -> Endpoint:
    endpoint = Endpoint(cluster=cluster, framework="vllm", models=("m",), transport="parsl", kind="vllm", base_url="")
    endpoint.observe(Availability(state, **seen))  # type: ignore[arg-type]
    return endpoint


def test_a_model_only_queued_somewhere_is_started_there_and_the_caller_told_when() -> None:
    start = time.time() + 3600
    queued = make("polaris", "queued", estimated_start=start)
    runtime = Starts()
    with pytest.raises(ServiceUnavailable) as refused:
        _route(runtime, [make("down", "offline"), queued], "m", cluster_route=False)  # type: ignore[arg-type]
    error = refused.value
    assert error.code == "model_queued" and error.headers["retry-after"] == "30"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start))
    assert f"queued on cluster 'polaris', estimated start {when}" in error.message
    assert runtime.started == [("polaris/vllm", "m")]


def test_the_soonest_queue_is_the_one_started() -> None:
    late = make("late", "queued", estimated_start=time.time() + 7200)
    soon = make("soon", "queued", estimated_start=time.time() + 600)
    runtime = Starts()
    with pytest.raises(ServiceUnavailable):
        _route(runtime, [late, soon], "m", cluster_route=False)  # type: ignore[arg-type]
    assert runtime.started == [("soon/vllm", "m")]


def test_hot_anywhere_beats_queued_elsewhere() -> None:
    runtime = Starts()
    chosen = _route(runtime, [make("queued", "queued"), make("hot", "hot")], "m", cluster_route=False)  # type: ignore[arg-type]
    assert chosen[0].cluster == "hot" and runtime.started == []


def test_hold_sends_the_request_to_the_starting_endpoint() -> None:
    runtime = Starts(when_not_hot="hold")
    chosen = _route(runtime, [make("booting", "starting")], "m", cluster_route=False)  # type: ignore[arg-type]
    assert [endpoint.cluster for endpoint in chosen] == ["booting"] and runtime.started == []
