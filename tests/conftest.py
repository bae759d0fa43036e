"""Fixtures shared by the tiers: the local Globus Compute site (service, RabbitMQ vhost, endpoint daemon)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import ComputeService, VirtualHost
from tests.support import MODEL, stop_model_servers


@pytest.fixture(scope="session")
def compute_service() -> Iterator[ComputeService]:
    """The local Globus Compute service over a RabbitMQ virtual host made for this run and removed after it."""
    with VirtualHost() as vhost, ComputeService(vhost.name) as service:
        yield service


@pytest.fixture
def compute_env(compute_service: ComputeService, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's SDK pointed at the local service, logged in as the gateway's client identity."""
    env = {**compute_service.env(), **credentials()}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def compute_site(compute_service: ComputeService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeSite]:
    """One endpoint daemon from the local template, serving the simulator, shared by every test that needs one."""
    folder = tmp_path_factory.mktemp("compute-site")
    state_dir = folder / "node"
    daemon = EndpointDaemon("local-inference", folder, compute_service.env())
    command = simulator_command(MODEL, options=("--tpot", "0.002"))
    try:
        yield ComputeSite(daemon, "local-globus", MODEL, command, state_dir).set_up()
    finally:
        daemon.stop()
        if state_dir.exists():
            stop_model_servers(state_dir)
