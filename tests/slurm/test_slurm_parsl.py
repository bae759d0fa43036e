"""The ``parsl`` transport on a real Slurm cluster: the gateway's executor submits its block with ``sbatch``.

One gateway, two clusters serving one model: ``hpc`` (``parsl``, ``provider: slurm``; the workers launch the
simulator) and ``cloud`` (``direct``, a simulator). The block first waits in Slurm's queue behind a job that holds
every core: ``hpc`` is ``queued``, the federated route uses ``cloud``, and a request to ``hpc`` by name gets the
documented 503. Once the cores are free the block runs and ``hpc`` answers, whole and streamed. When the gateway
stops, the block's job is cancelled.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer, free_port
from gateway.simulator import command as simulator_command
from tests.slurm.cluster import Job, SlurmCluster
from tests.support import TOKEN, endpoint, gateway, metric, scrape, simulator

MODEL = "facebook/opt-125m"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]


def slurm_parsl(cluster: SlurmCluster, worker_init: str = "") -> dict[str, Any]:
    """The ``parsl`` settings of an endpoint whose workers run in a Slurm job on ``cluster``."""
    return {
        "provider": "slurm",
        "provider_options": {"partition": cluster.partition, "walltime": "00:10:00", "cmd_timeout": 30},
        # srun starts the workers as soon as the job runs; Parsl looks at its blocks every second.
        "launcher": "srun",
        "strategy_period": 1,
        # The job's shell finds Parsl's worker pool and the compute functions in this virtualenv.
        "worker_init": f"export PATH={Path(sys.executable).parent}:$PATH; {worker_init}",
        "max_workers_per_node": 2,
        "init_blocks": 1,
        "min_blocks": 1,
        "max_blocks": 1,
    }


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not met after {timeout:g} s"
        time.sleep(0.2)


@dataclass
class Site:
    cluster: SlurmCluster
    front: ModelServer
    http: httpx.Client
    cloud: ModelServer
    hpc_port: int
    occupier: str
    stop_gateway: Callable[[], None]

    def states(self) -> dict[str, str]:
        listed = self.http.get("/resource_server/list-endpoints").json()["data"]
        return {entry["cluster"]: entry["state"] for entry in listed}

    def endpoint(self, cluster: str, *, state: str, estimated: bool) -> dict[str, Any] | None:
        """``cluster``'s entry in ``list-endpoints`` if it is in ``state`` (and has an estimated start)."""
        listed = self.http.get("/resource_server/list-endpoints").json()["data"]
        (entry,) = [entry for entry in listed if entry["cluster"] == cluster]
        if entry["state"] != state or (estimated and entry["estimated_start"] is None):
            return None
        return dict(entry)

    def chat(self, path: str = "/resource_server/v1") -> httpx.Response:
        return self.http.post(f"{path}/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 4})

    def block(self) -> Job | None:
        """The Slurm job of the executor's block."""
        return next((job for job in self.cluster.jobs() if job.name.startswith("parsl.")), None)


@pytest.fixture(scope="module")
def site(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("slurm-parsl")
    hpc_port = free_port()
    with ExitStack() as stack:
        # The job that holds every core is there first: the block's job will wait behind it.
        occupier = slurm_cluster.submit(f"--cpus-per-task={slurm_cluster.cpus}", "--time=10", "--job-name=occupier")
        stack.callback(lambda: slurm_cluster.job(occupier) and slurm_cluster.cancel(occupier))
        slurm_cluster.wait_for(occupier, "RUNNING")
        cloud = stack.enter_context(simulator("--tpot", "0.002"))
        launch = simulator_command(MODEL, options=("--tpot", "0.002"))
        config = {
            "server": {"request_timeout": 60},
            "auth": {"providers": ["dev"]},
            "federation": {"status_interval": 0.5, "status_jitter": 0.1, "stale_after": 10, "retry_after": 2},
            "endpoints": [
                endpoint(cloud.base_url, cluster="cloud"),
                {
                    "cluster": "hpc",
                    "framework": "vllm",
                    "models": [MODEL],
                    "transport": "parsl",
                    # The workers take a few seconds to start, as on a site where the job's shell loads modules.
                    "parsl": slurm_parsl(slurm_cluster, worker_init="sleep 3"),
                    "worker_model_server": {
                        "command": launch,
                        "port": hpc_port,
                        "state_dir": str(tmp / "servers"),
                        "startup_timeout": 30,
                    },
                },
            ],
        }
        # The gateway submits with sbatch and asks scontrol: both find the cluster through SLURM_CONF.
        gateways = stack.enter_context(ExitStack())
        front = gateways.enter_context(gateway(config, tmp, env=slurm_cluster.env))
        http = stack.enter_context(
            httpx.Client(
                base_url=f"http://127.0.0.1:{front.port}", timeout=30, headers={"authorization": f"Bearer {TOKEN}"}
            )
        )
        yield Site(slurm_cluster, front, http, cloud, hpc_port, occupier, gateways.close)


def test_the_block_waits_behind_a_running_job(site: Site) -> None:
    block = wait_for(site.block, what="the block's sbatch")
    assert block.state == "PENDING" and block.name.startswith("parsl.hpc-0.block-0.")
    block = site.cluster.wait_until_considered(block.job_id)
    assert block.reason in {"Resources", "Priority"}, block

    # The gateway's next status round sees what Slurm said; the occupier's 10-minute limit lets Slurm estimate
    # when the block starts.
    listed = wait_for(lambda: site.endpoint("hpc", state="queued", estimated=True), what="hpc queued, with a start")
    assert listed["detail"] == f"the workers' job waits ({block.reason})"
    assert site.states() == {"cloud": "hot", "hpc": "queued"}

    jobs = site.http.get("/resource_server/hpc/jobs").json()
    assert jobs["running"] == [] and jobs["starting"] == []
    (queued,) = jobs["queued"]
    assert queued["job_id"] == block.job_id and queued["endpoint"] == "hpc/vllm"
    assert queued["scheduler_state"] == "PENDING" and queued["reason"] == block.reason
    assert queued["queue"] == site.cluster.partition and queued["name"] == block.name
    assert queued["estimated_start"] and queued["nodes"] == []
    models = site.http.get("/resource_server/hpc/models").json()["data"]
    assert [(model["id"], model["state"]) for model in models] == [(MODEL, "queued")]
    # Queued is not down: the cluster is reachable and its model is on its way.
    assert site.http.get("/resource_server/status").json()["clusters"]["hpc"]["status"] == "up"


def test_the_federation_passes_over_the_queued_cluster(site: Site) -> None:
    wait_for(lambda: site.states()["hpc"] == "queued", what="hpc queued")
    served = metric(scrape(f"{site.cloud.base_url.removesuffix('/v1')}/metrics"), "vllm:request_success_total")
    for _ in range(5):
        assert site.chat().status_code == 200
    after = metric(scrape(f"{site.cloud.base_url.removesuffix('/v1')}/metrics"), "vllm:request_success_total")
    assert after - served == 5

    # Asked by name, hpc says it is queued, with Slurm's estimated start, and the model is being started.
    refused = site.chat("/resource_server/hpc/vllm/v1")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    error = refused.json()["error"]
    assert error["code"] == "model_queued"
    assert f"'{MODEL}' is queued on cluster 'hpc', estimated start " in error["message"]


def test_the_block_runs_once_the_cores_are_free_and_answers(site: Site) -> None:
    site.cluster.cancel(site.occupier)
    wait_for(lambda: (block := site.block()) is not None and block.state == "RUNNING", what="the block running")
    # Slurm's word counts at once, not Parsl's view of its block, which it refreshes once a minute.
    wait_for(lambda: site.states()["hpc"] == "starting", timeout=10, what="hpc starting while the workers start")
    # The warm-up that the 503 started launches the model server on the block's node.
    wait_for(lambda: site.states()["hpc"] == "hot", timeout=60, what="hpc hot")
    jobs = site.http.get("/resource_server/hpc/jobs").json()
    (running,) = jobs["running"]
    assert running["scheduler_state"] == "RUNNING" and running["nodes"] == [site.cluster.node]

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{site.front.port}/resource_server/hpc/vllm/v1",
        api_key=TOKEN,
        max_retries=0,
        timeout=60,
    )
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=50)  # type: ignore[arg-type]
    assert answer.choices[0].message.content and answer.usage is not None and answer.usage.completion_tokens == 50
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) == 20 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    # The answers came from the simulator the worker launched in the Slurm job.
    hpc_metrics = scrape(f"http://127.0.0.1:{site.hpc_port}/metrics")
    assert metric(hpc_metrics, "vllm:request_success_total") >= 3


def test_stopping_the_gateway_cancels_the_block(site: Site) -> None:
    block = site.block()
    assert block is not None and block.state == "RUNNING"
    site.stop_gateway()
    # The gateway's Parsl cleanup ran scancel: the job leaves the queue (through COMPLETING) and takes its
    # processes, the workers and the model server they launched, with it.
    site.cluster.wait_for(block.job_id, None, timeout=30)
    ended = site.cluster.job(block.job_id, ended=True)
    assert ended is not None and ended.state == "CANCELLED"
    wait_for(lambda: not _port_open(site.hpc_port), what="the model server gone")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_request_starts_the_block_when_none_runs(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # No block at start (init_blocks: 0, as in the operator guide's example) and when_not_hot: hold: the first
    # request makes Parsl submit the block, waits for its workers and the model server they launch, and is answered.
    parsl = {**slurm_parsl(slurm_cluster), "init_blocks": 0, "min_blocks": 0}
    config = {
        "server": {"request_timeout": 60},
        "auth": {"providers": ["dev"]},
        "federation": {"when_not_hot": "hold"},
        "endpoints": [
            {
                "cluster": "hpc",
                "framework": "vllm",
                "models": [MODEL],
                "transport": "parsl",
                "parsl": parsl,
                "worker_model_server": {
                    "command": simulator_command(MODEL),
                    "state_dir": str(tmp_path / "servers"),
                    "startup_timeout": 30,
                },
            }
        ],
    }
    with gateway(config, tmp_path, env=slurm_cluster.env) as front:
        # Parsl looks at its blocks every second: long enough to have submitted one it should not have.
        time.sleep(2)
        assert not [job for job in slurm_cluster.jobs() if job.name.startswith("parsl.")], "a block without requests"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{front.port}/resource_server/v1", api_key=TOKEN, max_retries=0, timeout=60
        )
        started = time.monotonic()
        answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
        print(f"first answer through a new Slurm block after {time.monotonic() - started:.1f} s")
        assert answer.usage is not None and answer.usage.completion_tokens == 5
        (block,) = [job for job in slurm_cluster.jobs() if job.name.startswith("parsl.")]
        assert block.state == "RUNNING"
    slurm_cluster.wait_for(block.job_id, None)
