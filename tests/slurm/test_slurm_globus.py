"""The Globus Compute endpoint template for Slurm, started by the real daemon, on the session's Slurm cluster.

The endpoint is made from ``endpoint_configs/globus-compute/slurm-cpu/`` as docs/operator-guide.md says, with the
cluster's partition filled in: its user endpoint submits the workers' block with ``sbatch`` when the first task
arrives (``init_blocks: 0``). The first chat completion through a real ``inference-gateway serve`` starts the user
endpoint and the block and is answered (it prints how long that took); ``/resource_server/{cluster}/jobs`` names
the block's Slurm job, as ``squeue`` does; a compute function runs in that block through the SDK; stopping the
endpoint cancels the job.

The user endpoint finds the cluster through ``SLURM_CONF`` in its ``user_environment.yaml`` (a site's Slurm is found
through ``/etc/slurm``); the block's job inherits it from ``sbatch``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import ComputeService
from tests.slurm.cluster import Job, SlurmCluster
from tests.slurm.test_slurm_parsl import QUESTION, wait_for
from tests.support import MODEL, TOKEN, gateway, stop_model_servers

CLUSTER = "slurm-globus"


@dataclass
class SlurmSite:
    site: ComputeSite
    cluster: SlurmCluster
    service: ComputeService
    state_dir: Path

    def block(self) -> Job | None:
        """The Slurm job of the user endpoint's block (Parsl names its jobs ``parsl.<label>.block-<n>...``)."""
        return next((job for job in self.cluster.jobs() if job.name.startswith("parsl.")), None)


@pytest.fixture(scope="module")
def slurm_site(
    compute_service: ComputeService, slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlurmSite]:
    folder = tmp_path_factory.mktemp("slurm-globus")
    state_dir = folder / "node"
    slurm_conf = slurm_cluster.env["SLURM_CONF"]
    daemon = EndpointDaemon(
        "slurm-inference",
        folder,
        {**compute_service.env(), "SLURM_CONF": slurm_conf},
        site="slurm-cpu",
        values={"CHANGE-ME-cpu-partition": slurm_cluster.partition},
        environment={"SLURM_CONF": slurm_conf},
    )
    command = simulator_command(MODEL, options=("--tpot", "0.002"))
    try:
        site = ComputeSite(daemon, CLUSTER, MODEL, command, state_dir).set_up()
        yield SlurmSite(site, slurm_cluster, compute_service, state_dir)
    finally:
        daemon.stop()
        if state_dir.exists():
            stop_model_servers(state_dir)


def test_the_first_chat_completion_starts_the_user_endpoint_and_its_block(
    slurm_site: SlurmSite, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = {
        "server": {"request_timeout": 60},
        "auth": {"providers": ["dev"]},
        # The node has no model server yet: the first request waits for it rather than getting a 503.
        "federation": {"status_interval": 1, "stale_after": 20, "when_not_hot": "hold"},
        "endpoints": [slurm_site.site.endpoint()],
    }
    env = {**slurm_site.service.env(), **credentials()}
    with gateway(config, tmp_path_factory.mktemp("slurm-globus-front"), env=env) as front:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{front.port}/resource_server/{CLUSTER}/vllm/v1",
            api_key=TOKEN,
            max_retries=0,
            timeout=120,
        )
        # No task yet, no user endpoint, no block: the template starts none.
        assert slurm_site.block() is None
        assert not slurm_site.site.daemon.user_endpoint_processes()
        started = time.monotonic()
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
        print(f"first answer, user endpoint stopped and no Slurm block: {time.monotonic() - started:.1f} s")
        assert answer.usage is not None and answer.usage.completion_tokens == 5

        block = slurm_site.block()
        assert block is not None and block.state == "RUNNING"
        with httpx.Client(
            base_url=f"http://127.0.0.1:{front.port}", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as http:

            def running() -> list[dict[str, object]]:
                return list(http.get(f"/resource_server/{CLUSTER}/jobs").json()["running"])

            # The status function, run in the block, names the job it runs in.
            (job,) = wait_for(
                lambda: [job for job in running() if job.get("job_id")], timeout=30, what="the block in /jobs"
            )
            assert job["job_id"] == block.job_id and job["endpoint"] == f"{CLUSTER}/vllm"
            assert job["scheduler_state"] == "RUNNING" and job["queue"] == slurm_site.cluster.partition
            assert job["nodes"] == [slurm_site.cluster.node] and job["name"] == block.name


def test_a_compute_function_runs_in_the_block_that_the_endpoint_submits(slurm_site: SlurmSite) -> None:
    # The registered status function, through the real SDK, on the block's worker.
    slurm_site.site.warm_up()
    block = slurm_site.block()
    assert block is not None and block.state == "RUNNING", block
    assert ".block-0." in block.name
    # The user endpoint's next heartbeat carries the workers that run in that job.
    details = wait_for(
        lambda: (
            (found := slurm_site.service.status(slurm_site.site.endpoint_id)["details"]).get("total_workers") and found
        ),
        what="the workers in the endpoint's heartbeat",
    )
    assert details["provider_type"] == "SlurmProvider" and details["queue"] == slurm_site.cluster.partition
    assert block.job_id in details["node_info"]


def test_stopping_the_endpoint_cancels_the_block(slurm_site: SlurmSite) -> None:
    block = slurm_site.block()
    assert block is not None and block.state == "RUNNING"
    slurm_site.site.daemon.stop()
    # The user endpoint's engine scales its blocks in with scancel on the way out.
    slurm_site.cluster.wait_for(block.job_id, None, timeout=30)
    ended = slurm_site.cluster.job(block.job_id, ended=True)
    assert ended is not None and ended.state in {"CANCELLED", "COMPLETED"}, ended
