"""The globus-compute-endpoint templates, configured and rendered by the endpoint's own commands and loader.

Each site's three files go through ``globus-compute-endpoint configure`` as the
operator guide says, the daemon's configuration through the endpoint's own
``get_config`` (which refuses an ``engine`` block there), and the user endpoint's
through ``globus-compute-endpoint render-user-config`` and ``load_config_yaml``.
The local template is also started for real (tests/integration/test_globus_compute_endpoint.py), and so is
slurm-cpu, on the test session's Slurm cluster (tests/slurm/test_slurm_globus.py); PBS Pro has no Debian package.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from globus_compute_endpoint.endpoint.config import CoreEndpointConfig, UserEndpointConfig
from globus_compute_endpoint.endpoint.config.utils import get_config, load_config_yaml
from globus_compute_endpoint.engines import GlobusComputeEngine
from parsl.launchers import MpiExecLauncher, SrunLauncher
from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

from tests.compute_endpoint import TEMPLATES, EndpointDaemon, fill
from tests.globus_compute_service import ComputeService

SITES = ["local", "pbspro-gpu", "slurm-cpu", "slurm-gpu"]
# What an operator of each kind of site fills in.
SITE_VALUES = {
    "local": {},
    "pbspro-gpu": {
        "CHANGE-ME-allocation": "inference",
        "CHANGE-ME-queue": "prod",
        "CHANGE-ME-filesystem": "eagle",
        "CHANGE-ME/model-weights": "/eagle/inference/model-weights",
    },
    "slurm-cpu": {"CHANGE-ME-cpu-partition": "cpu"},
    "slurm-gpu": {
        "CHANGE-ME-gpu-partition": "gpuA100x4",
        "CHANGE-ME-account": "bbjr-delta-gpu",
        "CHANGE-ME/model-weights": "/projects/inference/model-weights",
    },
}


class Site:
    """One template after ``globus-compute-endpoint configure``: the daemon's and the user endpoint's config."""

    def __init__(self, name: str, folder: Path) -> None:
        self.daemon = EndpointDaemon(
            f"{name}-inference", folder, ComputeService.env(), site=name, values=SITE_VALUES[name]
        ).configure()
        core = get_config(self.daemon.endpoint_dir)
        assert isinstance(core, CoreEndpointConfig)
        self.core = core
        self.rendered = self.daemon.command("render-user-config", "--endpoint", self.daemon.name)
        user = load_config_yaml(self.rendered)
        assert isinstance(user, UserEndpointConfig)
        self.user = user

    @property
    def engine(self) -> GlobusComputeEngine:
        assert isinstance(self.user.engine, GlobusComputeEngine)
        return self.user.engine

    def close(self) -> None:
        self.user.engine.shutdown()


@pytest.fixture(scope="module", params=SITES)
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    configured = Site(request.param, tmp_path_factory.mktemp(request.param))
    yield configured
    configured.close()


def test_every_template_directory_is_tested() -> None:
    assert sorted(path.name for path in TEMPLATES.iterdir() if path.is_dir()) == SITES
    for name in SITES:
        files = sorted(path.name for path in (TEMPLATES / name).iterdir())
        assert files == ["config.yaml", "user_config_template.yaml.j2", "user_environment.yaml"]


def test_the_daemon_config_has_no_engine_and_names_its_operator(site: Site) -> None:
    # globus-compute-endpoint 4.x refuses to start a config.yaml with an engine block.
    assert "engine" not in (TEMPLATES / site.daemon.site / "config.yaml").read_text()
    assert site.core.email == site.daemon.email
    # configure added no identity mapping: user endpoints run for the daemon's own identity only.
    assert site.core.identity_mapping_config_path is None


def test_pbspro_template_asks_for_whole_gpu_nodes(tmp_path: Path) -> None:
    site = Site("pbspro-gpu", tmp_path)
    try:
        provider = site.engine.executor.provider
        assert isinstance(provider, PBSProProvider)
        assert provider.select_options == "ngpus=4" and provider.walltime == "06:00:00"
        assert provider.account == "inference" and provider.queue == "prod"
        assert "filesystems=home:eagle" in provider.scheduler_options
        assert isinstance(provider.launcher, MpiExecLauncher)
        assert provider.init_blocks == provider.min_blocks == 0
        assert site.core.amqp_port == 443
    finally:
        site.close()


def test_slurm_template_asks_for_whole_gpu_nodes(tmp_path: Path) -> None:
    site = Site("slurm-gpu", tmp_path)
    try:
        provider = site.engine.executor.provider
        assert isinstance(provider, SlurmProvider)
        assert provider.gpus_per_node == 4 and provider.exclusive
        assert provider.partition == "gpuA100x4" and provider.account == "bbjr-delta-gpu"
        assert isinstance(provider.launcher, SrunLauncher)
        assert site.core.amqp_port == 443
    finally:
        site.close()


def test_slurm_cpu_template_shares_its_node(tmp_path: Path) -> None:
    # Started for real on the test session's Slurm cluster in tests/slurm/test_slurm_globus.py.
    site = Site("slurm-cpu", tmp_path)
    try:
        provider = site.engine.executor.provider
        assert isinstance(provider, SlurmProvider)
        assert provider.gpus_per_node is None and not provider.exclusive and provider.cores_per_node == 1
        assert provider.partition == "cpu" and provider.account is None
        assert isinstance(provider.launcher, SrunLauncher)
        assert provider.init_blocks == provider.min_blocks == 0 and provider.max_blocks == 1
    finally:
        site.close()


def test_local_template_keeps_its_workers(tmp_path: Path) -> None:
    site = Site("local", tmp_path)
    try:
        provider = site.engine.executor.provider
        assert isinstance(provider, LocalProvider)
        assert provider.init_blocks == provider.min_blocks == provider.max_blocks == 1
    finally:
        site.close()


def test_workers_relay_many_requests_at_once(site: Site) -> None:
    executor = site.engine.executor
    # Pinning workers to GPUs would cap them at the GPU count; the model server owns the GPUs.
    assert executor.available_accelerators == []
    assert executor.max_workers_per_node >= 16
    # Workers wait on the model server: the core count must not cap them.
    assert executor.cores_per_worker < 1


def test_worker_init_activates_the_worker_environment(site: Site) -> None:
    worker_init = site.engine.executor.provider.worker_init
    assert f"source {site.daemon.values['CHANGE-ME/inference-env']}/bin/activate" in worker_init


def test_what_a_submitter_sends_does_not_change_the_workers(site: Site) -> None:
    # The endpoint's default template would turn the SDK's runtime into `uv pip install` in worker_init.
    assert "uv " not in site.rendered and "curl" not in site.rendered


def test_templates_mark_every_site_value() -> None:
    for name in SITES:
        for path in (TEMPLATES / name).iterdir():
            assert "CHANGE-ME" in path.read_text(), f"{path} should mark what the operator fills in"
        assert "allowed_functions" in (TEMPLATES / name / "config.yaml").read_text()
        with pytest.raises(AssertionError, match="placeholders not filled"):
            fill((TEMPLATES / name / "user_environment.yaml").read_text(), {})
