"""What the status page says about a model that is not hot: from its endpoints' states and the scheduler's estimate."""

from __future__ import annotations

import time

from gateway.api.status import _wait, wants_html
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint


def endpoint(cluster: str, availability: Availability, models: tuple[str, ...] = ("m",)) -> Endpoint:
    found = Endpoint(cluster=cluster, framework="vllm", models=models, transport="parsl", kind="vllm", base_url="")
    found.availability = availability
    return found


def test_hot_anywhere_means_no_wait() -> None:
    now = time.time()
    endpoints = [
        endpoint("a", Availability("cold", observed_at=now)),
        endpoint("b", Availability("hot", observed_at=now)),
    ]
    assert _wait(endpoints, "m", now) == {"state": "hot", "hot_on": ["b/vllm"], "expected_wait_seconds": 0.0}


def test_a_queued_job_waits_for_the_schedulers_earliest_estimate() -> None:
    now = time.time()
    endpoints = [
        endpoint("a", Availability("queued", observed_at=now, estimated_start=now + 600)),
        endpoint("b", Availability("queued", observed_at=now, estimated_start=now + 120)),
        endpoint("c", Availability("offline", observed_at=now)),
    ]
    assert _wait(endpoints, "m", now) == {"state": "queued", "hot_on": [], "expected_wait_seconds": 120.0}


def test_starting_cold_and_maintenance_have_no_estimate() -> None:
    now = time.time()
    starting = [endpoint("a", Availability("starting", observed_at=now)), endpoint("b", Availability("cold"))]
    assert _wait(starting, "m", now)["state"] == "starting"
    assert _wait(starting, "m", now)["expected_wait_seconds"] is None
    closed = endpoint("c", Availability("hot", observed_at=now))
    closed.maintenance = "new disks"
    assert _wait([closed], "m", now) == {"state": "maintenance", "hot_on": [], "expected_wait_seconds": None}


def test_browsers_get_the_page_and_scripts_the_json() -> None:
    class Asked:
        def __init__(self, accept: str | None) -> None:
            self.headers = {"accept": accept} if accept is not None else {}

    assert wants_html(Asked("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"))  # type: ignore[arg-type]
    assert not wants_html(Asked("*/*"))  # type: ignore[arg-type]
    assert not wants_html(Asked(None))  # type: ignore[arg-type]
    assert not wants_html(Asked("application/json, text/html"))  # type: ignore[arg-type]
