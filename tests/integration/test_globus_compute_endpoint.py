"""The compute functions on the real endpoint daemon, submitted with the real SDK ``Executor``.

Everything runs for real on this machine: the local Globus Compute service
(``tests/globus_compute_service.py``) with RabbitMQ, ``globus-compute-endpoint``
started from ``endpoint_configs/globus-compute/local/`` as the operator guide
says, its user endpoint with Parsl's workers, and the functions registered by
``inference-gateway register-functions``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml
from globus_compute_sdk import Client, Executor
from globus_compute_sdk.errors import TaskExecutionFailed

from gateway.dispatch.compute import FUNCTIONS
from tests.compute_endpoint import ComputeSite
from tests.globus_compute_service import ComputeService


@pytest.fixture
def executor(compute_site: ComputeSite, compute_env: dict[str, str]) -> Iterator[Executor]:
    with Executor(endpoint_id=compute_site.endpoint_id, client=Client()) as executor:
        yield executor


def node_report(site: ComputeSite, executor: Executor) -> dict[str, object]:
    request = {"model_server": {"state_dir": str(site.state_dir)}, "scheduler": "none"}
    report = executor.submit_to_registered_function(site.function_ids["status"], args=(request,)).result(timeout=120)
    assert isinstance(report, dict)
    return report


def test_register_functions_writes_the_ids_and_the_allowed_functions_block(compute_site: ComputeSite) -> None:
    assert set(compute_site.function_ids) == set(FUNCTIONS)
    for name, function_id in compute_site.function_ids.items():
        assert f"registered {FUNCTIONS[name]} as {function_id}" in compute_site.printed
    config = yaml.safe_load((compute_site.daemon.endpoint_dir / "config.yaml").read_text())
    assert sorted(config["allowed_functions"]) == sorted(compute_site.function_ids.values())
    assert "engine" not in config


def test_the_status_function_runs_on_the_endpoints_workers(compute_site: ComputeSite, executor: Executor) -> None:
    report = node_report(compute_site, executor)

    assert report["models"] == []


def test_the_service_reports_the_user_endpoints_workers(
    compute_site: ComputeSite, compute_service: ComputeService, executor: Executor
) -> None:
    node_report(compute_site, executor)
    deadline = time.monotonic() + 20
    while not compute_service.status(compute_site.endpoint_id)["details"].get("total_workers"):
        assert time.monotonic() < deadline, compute_service.status(compute_site.endpoint_id)
        time.sleep(0.5)

    details = compute_service.status(compute_site.endpoint_id)["details"]
    # The local template: one block of 16 workers, kept while the user endpoint runs.
    assert details["total_workers"] == 16 and details["provider_type"] == "LocalProvider"


def test_a_function_raising_on_the_worker_comes_back_with_its_traceback(
    compute_site: ComputeSite, executor: Executor
) -> None:
    future = executor.submit_to_registered_function(compute_site.function_ids["inference"], args=("not a request",))

    with pytest.raises(TaskExecutionFailed) as failed:
        future.result(timeout=120)
    assert "Traceback" in failed.value.remote_data


def reads_a_file(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def test_a_function_not_in_allowed_functions_is_refused_by_the_endpoint(
    compute_site: ComputeSite, executor: Executor
) -> None:
    function_id = executor.client.register_function(reads_a_file)

    future = executor.submit_to_registered_function(function_id, args=("/etc/hostname",))

    with pytest.raises(TaskExecutionFailed) as refused:
        future.result(timeout=120)
    assert f"Function {function_id} not permitted" in str(refused.value)
