"""Fixtures shared by several tiers: the local Globus Compute site (service with its RabbitMQ queues, endpoint
daemon) and a single-node Slurm cluster."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import ComputeService, take_port_lock
from tests.slurm.cluster import SlurmCluster
from tests.support import MODEL, stop_model_servers

# The machine's lock on the local Globus Compute service's fixed port, when a collected test needs the service.
_port_lock: list[int] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Wait for another run's local Globus Compute service to stop (the port is fixed), for as long as a whole suite
    takes, before the first test starts: a wait inside a fixture would count against that test's timeout."""
    if any("compute_service" in getattr(item, "fixturenames", ()) for item in session.items):
        _port_lock.append(take_port_lock(3600))


@pytest.fixture(scope="session")
def compute_service() -> Iterator[ComputeService]:
    """The local Globus Compute service, with AMQP names of this run's own that it removes when it stops."""
    with ComputeService(port_lock=_port_lock.pop() if _port_lock else None, wait=3600) as service:
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


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster of the test session's own (see ``tests/slurm/cluster.py``).

    Missing Slurm or munge fails the tests that use it, with the command that installs them.
    """
    # Not under pytest's temporary folder: munged refuses a socket below a folder that others cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="inference-gateway-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
