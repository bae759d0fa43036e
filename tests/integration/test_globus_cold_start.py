"""A request to a ``globus`` endpoint whose user endpoint has stopped for being idle.

The endpoint daemon (from the local template) stops its user endpoint, with the
workers, after ``idle_heartbeats_soft`` idle heartbeats; the next task makes the
service send ``cmd_start_endpoint`` again. The Globus Compute service then reports
the endpoint online without workers, which the gateway cannot tell apart from
an endpoint it has not observed: ``unknown``, which docs/federation.md routes
rather than refuses, so the request waits for the user endpoint and is answered.

The gateway here asks for status rarely: while the user endpoint has workers,
every status probe is a task that keeps it from ever being idle.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from compute_functions.model_server import ModelServer
from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import ComputeService
from tests.support import MODEL, TOKEN, gateway, stop_model_servers

IDLE_HEARTBEATS = 2


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
        "federation": {"status_interval": 300, "stale_after": 600},
        "endpoints": [idle_site.endpoint()],
    }
    env = {**compute_service.env(), **credentials()}
    with gateway(config, tmp_path_factory.mktemp("cold-front"), env=env) as server:
        yield server


def wait_for_idle_stop(site: ComputeSite, service: ComputeService, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while site.daemon.user_endpoint_processes() or service.status(site.endpoint_id)["details"]:
        assert time.monotonic() < deadline, "the user endpoint did not stop when idle"
        time.sleep(0.5)


def test_the_first_request_after_an_idle_stop_is_answered_once_the_user_endpoint_is_back(
    front: ModelServer, idle_site: ComputeSite, compute_service: ComputeService
) -> None:
    client = openai.OpenAI(
        base_url=f"http://{front.host}:{front.port}/resource_server/idle-globus/vllm/v1",
        api_key=TOKEN,
        max_retries=0,
        timeout=120,
    )
    # The model server is started once; it outlives the user endpoint on the node.
    client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    wait_for_idle_stop(idle_site, compute_service)
    starts = len(compute_service.commands)

    started = time.monotonic()
    answer = client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4)
    took = time.monotonic() - started

    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert len(compute_service.commands) > starts
    assert idle_site.daemon.user_endpoint_processes(), "the request did not start the user endpoint again"
    print(f"first answer after the idle stop: {took:.1f} s")
