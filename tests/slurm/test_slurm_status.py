"""The ``status`` compute function on a real Slurm cluster: what it reads from ``squeue`` and ``scontrol`` for a
running job, a job waiting behind it for cores, a held job and a job Slurm has already forgotten.

The recorded output of larger sites stays tested in ``tests/unit/test_worker_status.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from compute_functions import status
from tests.slurm.cluster import SlurmCluster

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$")


@pytest.fixture(scope="module")
def queue(slurm_cluster: SlurmCluster) -> Iterator[dict[str, str]]:
    """A job holding every core, a block waiting behind it for resources and a held block."""
    with slurm_cluster.occupied(minutes=10) as running:
        waiting = slurm_cluster.submit("--job-name=parsl.hpc-0.block-0.1", "--time=5")
        held = slurm_cluster.submit("--job-name=parsl.hpc-0.block-1.1", "--hold")
        slurm_cluster.wait_until_considered(waiting)
        slurm_cluster.wait_until_considered(held)
        yield {"running": running, "waiting": waiting, "held": held}
        for job_id in (waiting, held):
            slurm_cluster.cancel(job_id)


@pytest.fixture
def on_cluster(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # The function runs in this process, as it would on a node of the site: the client commands find the cluster
    # through SLURM_CONF.
    for name, value in slurm_cluster.env.items():
        monkeypatch.setenv(name, value)


def check_jobs(jobs: dict[str, dict[str, object]], queue: dict[str, str], cluster: SlurmCluster) -> None:
    running = jobs[queue["running"]]
    assert running["state"] == "running" and running["scheduler_state"] == "RUNNING"
    assert running["nodes"] == [cluster.node] and running["queue"] == cluster.partition
    assert ISO.match(str(running["started"])) and running["estimated_start"] is None and running["reason"] is None
    assert running["name"] == "occupier"

    waiting = jobs[queue["waiting"]]
    assert waiting["state"] == "queued" and waiting["scheduler_state"] == "PENDING"
    assert waiting["reason"] == "Resources" and waiting["nodes"] == [] and waiting["started"] is None
    # It can start when the job ahead of it reaches its 10-minute limit.
    assert ISO.match(str(waiting["estimated_start"])) and str(waiting["estimated_start"]) > str(running["started"])
    assert waiting["name"] == "parsl.hpc-0.block-0.1" and waiting["queue"] == cluster.partition

    held = jobs[queue["held"]]
    assert held["state"] == "queued" and held["reason"] == "JobHeldUser" and held["estimated_start"] is None


@pytest.mark.usefixtures("on_cluster")
def test_squeue_of_the_users_jobs(queue: dict[str, str], slurm_cluster: SlurmCluster) -> None:
    report = status.status({"scheduler": "auto"})
    assert report["scheduler"] == "slurm" and report["scheduler_error"] is None
    jobs = {job["job_id"]: job for job in report["jobs"]}
    assert set(jobs) == set(queue.values())
    check_jobs(jobs, queue, slurm_cluster)
    assert jobs[queue["waiting"]]["walltime"] == "5:00"


@pytest.mark.usefixtures("on_cluster")
def test_scontrol_of_an_executors_blocks(queue: dict[str, str], slurm_cluster: SlurmCluster) -> None:
    report = status.status({"scheduler": "slurm", "job_ids": list(queue.values())})
    assert report["scheduler_error"] is None
    jobs = {job["job_id"]: job for job in report["jobs"]}
    check_jobs(jobs, queue, slurm_cluster)
    assert jobs[queue["waiting"]]["walltime"] == "00:05:00"


@pytest.mark.usefixtures("on_cluster")
def test_only_jobs_whose_name_starts_with_the_prefix(queue: dict[str, str]) -> None:
    report = status.status({"scheduler": "slurm", "job_name": "parsl.hpc-0."})
    assert {job["job_id"] for job in report["jobs"]} == {queue["waiting"], queue["held"]}


@pytest.mark.usefixtures("on_cluster")
def test_a_block_slurm_forgot_is_left_out(queue: dict[str, str]) -> None:
    # An executor keeps the ids of blocks that ended; Slurm forgets them after MinJobAge. The others still count.
    report = status.status({"scheduler": "slurm", "job_ids": ["999999", queue["waiting"]]})
    assert report["scheduler_error"] is None
    assert [job["job_id"] for job in report["jobs"]] == [queue["waiting"]]


def test_without_slurm_conf_the_error_is_reported(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CONF", raising=False)
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    report = status.status({"scheduler": "slurm"})
    assert report["jobs"] == [] and report["scheduler_error"].startswith("slurm: squeue --noheader")


@pytest.mark.usefixtures("on_cluster")
def test_a_worker_names_the_job_it_runs_in(
    queue: dict[str, str], slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slurm gives every process of a job its id; a Globus Compute worker knows no block ids otherwise.
    monkeypatch.setenv("SLURM_JOB_ID", queue["running"])
    report = status.status({"scheduler": "none", "own_job": True})
    assert report["scheduler"] == "slurm" and report["scheduler_error"] is None
    (job,) = report["jobs"]
    assert job["job_id"] == queue["running"] and job["state"] == "running" and job["nodes"] == [slurm_cluster.node]
    # Outside a batch job there is no job to name, and no scheduler is asked.
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("PBS_JOBID", raising=False)
    assert status.status({"scheduler": "none", "own_job": True})["jobs"] == []
