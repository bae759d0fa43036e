"""A request to a ``globus`` endpoint whose user endpoint has stopped for being idle.

The endpoint daemon (from the local template) stops its user endpoint, with the
workers, after ``idle_heartbeats_soft`` idle heartbeats; the next task makes the
service send ``cmd_start_endpoint`` again. The Globus Compute service then reports
the endpoint online without workers' details: the gateway calls it ``cold``, so a
request gets the documented 503 "being started" at once and the gateway starts the
user endpoint in the background; the request after that is answered.

The gateway asks for status every second: the status probe runs a task only when
the service's heartbeat shows tasks other than its own since its last report, so
it does not keep the idle user endpoint from stopping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import ComputeService
from tests.support import MODEL, TOKEN, gateway, stop_model_servers

# 7 heartbeats of 5 s: the daemon starts a user endpoint again by itself when it stops within 30 s
# (mu_child_ep_grace_period_s) of a task's start command, and the one started so stops only when hard-idle.
IDLE_HEARTBEATS = 7
T = TypeVar("T")


@pytest.fixture(scope="module")
def idle_site(compute_service: ComputeService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeSite]:
    folder = tmp_path_factory.mktemp("idle-site")
    daemon = EndpointDaemon("idle-inference", folder, compute_service.env(), idle_heartbeats=IDLE_HEARTBEATS)
    command = simulator_command(MODEL, options=("--tpot", "0.002"))
    try:
        yield ComputeSite(daemon, "idle-globus", MODEL, command, folder / "node").set_up()
    finally:
        daemon.stop()
        if (folder / "node").exists():
            stop_model_servers(folder / "node")


@pytest.fixture(scope="module")
def front(
    idle_site: ComputeSite, compute_service: ComputeService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    config = {
        "server": {"request_timeout": 60},
        "auth": {"providers": ["dev"]},
        "federation": {"status_interval": 1, "stale_after": 20, "retry_after": 1},
        "endpoints": [idle_site.endpoint()],
    }
    env = {**compute_service.env(), **credentials()}
    with gateway(config, tmp_path_factory.mktemp("cold-front"), env=env) as server:
        yield server


def wait_for_idle_stop(site: ComputeSite, service: ComputeService, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while site.daemon.user_endpoint_processes() or service.status(site.endpoint_id)["details"]:
        assert time.monotonic() < deadline, "the user endpoint did not stop when idle"
        time.sleep(0.5)


def state_of(front: ModelServer) -> str:
    headers = {"authorization": f"Bearer {TOKEN}"}
    listed = httpx.get(f"http://{front.host}:{front.port}/resource_server/list-endpoints", headers=headers, timeout=10)
    (view,) = listed.json()["data"]
    return str(view["state"])


def answered_once_started(request: Callable[[], T], timeout: float = 120) -> T:
    """``request``'s answer, asked again each second while the gateway says the model is being started (503)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request()
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and "being started" in exc.message, exc.message
            assert time.monotonic() < deadline, exc.message
            time.sleep(1)


def test_a_stopped_user_endpoint_is_cold_and_the_request_after_the_503_is_answered(
    front: ModelServer, idle_site: ComputeSite, compute_service: ComputeService
) -> None:
    client = openai.OpenAI(
        base_url=f"http://{front.host}:{front.port}/resource_server/idle-globus/vllm/v1",
        api_key=TOKEN,
        max_retries=0,
        timeout=120,
    )
    # The model server is started once; it outlives the user endpoint on the node.
    answered_once_started(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    # The gateway keeps probing every second, yet the user endpoint stops when idle.
    wait_for_idle_stop(idle_site, compute_service)
    deadline = time.monotonic() + 30
    while state_of(front) != "cold":
        assert time.monotonic() < deadline, f"the stopped user endpoint is {state_of(front)}, not cold"
        time.sleep(0.5)
    starts = len(compute_service.commands)

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4)
    assert refused.value.status_code == 503 and "being started" in refused.value.message
    assert refused.value.response.headers.get("retry-after") == "1"
    answer = answered_once_started(
        lambda: client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4)
    )
    took = time.monotonic() - started

    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert len(compute_service.commands) > starts
    assert idle_site.daemon.user_endpoint_processes(), "the request did not start the user endpoint again"
    print(f"first answer after the idle stop (503, then retried each second): {took:.1f} s")
