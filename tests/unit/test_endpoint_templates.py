"""The globus-compute-endpoint templates load with the endpoint's own configuration loader."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from globus_compute_endpoint.endpoint.config import UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml
from globus_compute_endpoint.engines import GlobusComputeEngine
from parsl.launchers import MpiExecLauncher, SrunLauncher
from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

from tests.support import REPO

TEMPLATES = REPO / "endpoint_configs" / "globus-compute"


def load(name: str) -> Iterator[UserEndpointConfig]:
    config = load_config_yaml((TEMPLATES / name / "config.yaml").read_text())
    assert isinstance(config, UserEndpointConfig)
    try:
        yield config
    finally:
        config.engine.shutdown()


@pytest.fixture
def pbspro() -> Iterator[UserEndpointConfig]:
    yield from load("pbspro-gpu")


@pytest.fixture
def slurm() -> Iterator[UserEndpointConfig]:
    yield from load("slurm-gpu")


@pytest.fixture
def local() -> Iterator[UserEndpointConfig]:
    yield from load("local")


def test_every_template_directory_is_tested() -> None:
    assert sorted(path.name for path in TEMPLATES.iterdir() if path.is_dir()) == ["local", "pbspro-gpu", "slurm-gpu"]


def test_pbspro_template_asks_for_whole_gpu_nodes(pbspro: UserEndpointConfig) -> None:
    engine = pbspro.engine
    assert isinstance(engine, GlobusComputeEngine)
    provider = engine.executor.provider
    assert isinstance(provider, PBSProProvider)
    assert provider.select_options == "ngpus=4"
    assert provider.walltime == "06:00:00"
    assert provider.account.startswith("CHANGE-ME") and provider.queue.startswith("CHANGE-ME")
    assert isinstance(provider.launcher, MpiExecLauncher)
    assert pbspro.amqp_port == 443


def test_slurm_template_asks_for_whole_gpu_nodes(slurm: UserEndpointConfig) -> None:
    engine = slurm.engine
    assert isinstance(engine, GlobusComputeEngine)
    provider = engine.executor.provider
    assert isinstance(provider, SlurmProvider)
    assert provider.gpus_per_node == 4 and provider.exclusive
    assert provider.partition.startswith("CHANGE-ME") and provider.account.startswith("CHANGE-ME")
    assert isinstance(provider.launcher, SrunLauncher)


def test_local_template_keeps_its_workers(local: UserEndpointConfig) -> None:
    engine = local.engine
    assert isinstance(engine, GlobusComputeEngine)
    provider = engine.executor.provider
    assert isinstance(provider, LocalProvider)
    assert provider.init_blocks == provider.min_blocks == provider.max_blocks == 1


@pytest.mark.parametrize("name", ["pbspro-gpu", "slurm-gpu", "local"])
def test_workers_relay_many_requests_at_once(name: str) -> None:
    for config in load(name):
        engine = config.engine
        assert isinstance(engine, GlobusComputeEngine)
        # Pinning workers to GPUs would cap them at the GPU count; the model server owns the GPUs.
        assert engine.executor.available_accelerators == []
        assert engine.executor.max_workers_per_node >= 16


@pytest.mark.parametrize("name", ["pbspro-gpu", "slurm-gpu", "local"])
def test_worker_init_activates_the_worker_environment(name: str) -> None:
    for config in load(name):
        worker_init = config.engine.executor.provider.worker_init
        assert "source CHANGE-ME/inference-env/bin/activate" in worker_init


def test_templates_mark_every_site_value() -> None:
    for path in TEMPLATES.glob("*/config.yaml"):
        text = path.read_text()
        assert "CHANGE-ME" in text
        assert "allowed_functions" in text, f"{path} should show where the registered function ids go"
