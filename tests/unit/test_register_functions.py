"""``inference-gateway register-functions``: register the compute functions, write their ids into the registry.

These tests are about editing the registry file, so the client is a double that hands out ids; registration
with the local Globus Compute service, through the real SDK and the command itself, is in
tests/integration/test_globus_compute_endpoint.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import compute_functions.inference
import compute_functions.status
from gateway import cli
from gateway.config import ConfigError, load_config, parse_config
from gateway.dispatch.compute import FUNCTIONS, load_function
from gateway.dispatch.registration import write_function_ids
from tests.globus_doubles import ComputeService

REGISTRY = """\
# Two clusters reached through Globus Compute, one OpenAI-compatible server reached directly.
server:
  request_timeout: 600

endpoints:
  - cluster: polaris            # ALCF Polaris, PBS Pro
    framework: vllm
    models: [meta-llama/Meta-Llama-3-8B-Instruct]
    transport: globus
    globus:
      endpoint_id: "0c2f5e1a-3b5d-4a8e-9f1c-2d3e4f5a6b7c"   # globus-compute-endpoint list
      task_timeout: 900
    worker_model_server:
      command: ["vllm", "serve", "{model}", "--host", "{host}", "--port", "{port}", "--tensor-parallel-size", "4"]
      startup_timeout: 900

  - cluster: delta              # NCSA Delta, Slurm
    framework: vllm
    models: [mistralai/Mistral-7B-Instruct-v0.3]
    transport: globus
    globus: {endpoint_id: 7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a}
    worker_model_server: {command: ["vllm", "serve", "{model}", "--port", "{port}"]}

  - cluster: local
    framework: vllm
    models: [facebook/opt-125m]
    base_url: http://127.0.0.1:8001/v1
"""


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY)
    path.chmod(0o640)
    return path


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> ComputeService:
    service = ComputeService()
    monkeypatch.setattr("gateway.dispatch.globus.sdk_client", lambda: service)
    return service


def test_unregistered_globus_endpoint_is_refused_with_the_command_to_run(registry: Path) -> None:
    with pytest.raises(ConfigError, match="register-functions"):
        load_config(registry)


def test_registers_each_function_once_and_writes_the_ids_everywhere(
    registry: Path, service: ComputeService, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["register-functions", "--config", str(registry)]) == 0

    assert list(service.registered.values()) == [load_function(name) for name in FUNCTIONS]
    assert compute_functions.inference.inference in service.registered.values()
    assert compute_functions.status.status in service.registered.values()
    ids = dict(zip(FUNCTIONS, service.registered, strict=True))
    config = load_config(registry)
    for endpoint in config.endpoints[:2]:
        assert endpoint.globus is not None and endpoint.globus.function_ids is not None
        assert {name: str(getattr(endpoint.globus.function_ids, name)) for name in FUNCTIONS} == ids
    assert config.endpoints[2].globus is None
    out = capsys.readouterr().out
    assert "allowed_functions:" in out and all(function_id in out for function_id in ids.values())


def test_the_rest_of_the_file_is_left_as_written(registry: Path, service: ComputeService) -> None:
    cli.main(["register-functions", "--config", str(registry)])

    written = registry.read_text().splitlines()
    rewritten = "    globus: {endpoint_id: 7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a}"
    kept = iter(written)
    assert all(line in kept for line in REGISTRY.splitlines() if line != rewritten), "lines lost or reordered"
    assert len(written) == len(REGISTRY.splitlines()) + 1 + len(FUNCTIONS)  # function_ids: and one line each
    assert '      endpoint_id: "0c2f5e1a-3b5d-4a8e-9f1c-2d3e4f5a6b7c"   # globus-compute-endpoint list' in written
    assert registry.stat().st_mode & 0o777 == 0o640


def test_ids_are_rewritten_on_a_second_registration(registry: Path, service: ComputeService) -> None:
    cli.main(["register-functions", "--config", str(registry)])
    first = registry.read_text()
    cli.main(["register-functions", "--config", str(registry)])

    second = registry.read_text()
    assert len(second.splitlines()) == len(first.splitlines())
    newest = list(service.registered)[-len(FUNCTIONS) :]
    assert all(function_id in second for function_id in newest)


def test_only_the_named_endpoint_is_updated(
    registry: Path, service: ComputeService, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["register-functions", "--config", str(registry), "--endpoint", "delta/vllm"]) == 0

    data = yaml.safe_load(registry.read_text())
    assert "function_ids" not in data["endpoints"][0]["globus"]
    assert set(data["endpoints"][1]["globus"]["function_ids"]) == set(FUNCTIONS)
    assert "does not validate yet" in capsys.readouterr().out  # polaris still has no function ids


def test_unknown_endpoint_registers_nothing(
    registry: Path, service: ComputeService, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["register-functions", "--config", str(registry), "--endpoint", "aurora/vllm"]) == 2

    assert "no globus endpoint named aurora/vllm" in capsys.readouterr().err
    assert service.registered == {}
    assert registry.read_text() == REGISTRY


def test_refused_registration_leaves_the_file_alone(
    registry: Path, service: ComputeService, capsys: pytest.CaptureFixture[str]
) -> None:
    service.refuse_registration = PermissionError("403 Forbidden: the identity may not register functions")

    assert cli.main(["register-functions", "--config", str(registry)]) == 1

    assert "403 Forbidden" in capsys.readouterr().err
    assert registry.read_text() == REGISTRY


def test_file_without_globus_endpoints_is_refused_before_any_globus_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def login() -> None:
        raise AssertionError("a Globus Compute client was made: that starts a Globus login")

    monkeypatch.setattr("gateway.dispatch.globus.sdk_client", login)
    path = tmp_path / "direct.yaml"
    path.write_text("endpoints:\n  - {cluster: local, framework: vllm, models: [m], base_url: 'http://h/v1'}\n")

    assert cli.main(["register-functions", "--config", str(path)]) == 2
    assert "no endpoint has transport: globus, so there is nothing to register" in capsys.readouterr().err
    assert cli.main(["register-functions", "--config", "endpoint_configs/local.yaml"]) == 2


IDS = {"inference": "11111111-1111-4111-8111-111111111111", "status": "22222222-2222-4222-8222-222222222222"}


@pytest.mark.parametrize(
    ("globus", "expected"),
    [
        ("    globus:\n      endpoint_id: x\n", "    globus:\n      endpoint_id: x\n      function_ids:\n"),
        (
            "    globus:\n      function_ids:\n        inference: old  # keep\n      endpoint_id: x\n",
            f"    globus:\n      function_ids:\n        inference: {IDS['inference']}  # keep\n"
            f"        status: {IDS['status']}\n      endpoint_id: x\n",
        ),
        ("    globus:\n      function_ids:   # later\n      endpoint_id: x\n", "function_ids: {inference: "),
        ("    globus: {endpoint_id: x}\n", 'globus: {endpoint_id: "x", function_ids: {inference: '),
        ("    globus:\n      endpoint_id: x", "    globus:\n      endpoint_id: x\n      function_ids:\n"),
    ],
    ids=["absent", "partly there", "empty", "flow style", "no final newline"],
)
def test_function_ids_are_written_whatever_the_layout(globus: str, expected: str) -> None:
    text = "endpoints:\n  - transport: globus\n" + globus

    written = write_function_ids(text, [0], IDS)

    assert expected in written
    assert yaml.safe_load(written)["endpoints"][0]["globus"]["function_ids"] == IDS


def test_written_registry_still_validates(registry: Path) -> None:
    written = write_function_ids(registry.read_text(), [0, 1], IDS)

    config = parse_config(written)
    assert [str(endpoint.globus.function_ids.inference) for endpoint in config.endpoints[:2] if endpoint.globus] == [
        IDS["inference"]
    ] * 2
