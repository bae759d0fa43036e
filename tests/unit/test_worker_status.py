"""What the ``status`` compute function reads: vLLM's metrics and the schedulers' views of the model jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_functions import status
from compute_functions.metrics import ModelLoad, model_load

DATA = Path(__file__).resolve().parent.parent / "data"
LLAMA = "meta-llama/Meta-Llama-3.1-8B-Instruct"


def test_metrics_add_up_the_engines_of_a_model() -> None:
    loads = model_load((DATA / "vllm-metrics.txt").read_text())
    assert loads == {LLAMA: ModelLoad(running=5, waiting=7)}


def test_metrics_without_a_model_label_count_for_the_default_model() -> None:
    text = "vllm:num_requests_running 2.0\nvllm:num_requests_waiting 1\n"
    assert model_load(text, "tiny") == {"tiny": ModelLoad(running=2, waiting=1)}
    assert model_load("# nothing here\n") == {}


def test_qstat_gives_running_starting_and_queued_model_jobs() -> None:
    jobs = {job["job_id"].split(".")[0]: job for job in status.parse_qstat((DATA / "pbspro-qstat-f.txt").read_text())}
    # The exiting job (E) is left out; the held one waits like a queued one.
    assert set(jobs) == {"2148323", "2148331", "2148335", "2148102", "2148340"}
    running = jobs["2148323"]
    assert running["state"] == "running" and running["scheduler_state"] == "R/42"
    assert running["name"] == "parsl.polaris-0.block-0.1717162931.7354238"
    assert running["nodes"] == ["x3006c0s13b0n0", "x3006c0s13b1n0"]
    assert running["submitted"] == "2024-05-31T13:42:11" and running["started"] == "2024-05-31T13:42:45"
    assert running["elapsed"] == "00:42:17" and running["walltime"] == "06:00:00"
    assert running["queue"] == "demand" and running["owner"] == "gwuser"
    assert jobs["2148331"]["state"] == "starting" and jobs["2148331"]["nodes"] == ["x3102c0s25b0n0"]
    queued = jobs["2148335"]
    assert queued["state"] == "queued" and queued["nodes"] == [] and queued["started"] is None
    assert queued["estimated_start"] == "2024-05-31T16:05:00"
    assert str(queued["reason"]).startswith("Not Running: Insufficient amount of resource: ngpus")
    assert running["reason"] is None
    assert jobs["2148340"]["state"] == "queued" and jobs["2148340"]["scheduler_state"] == "H/20"


def test_qstat_joins_values_wrapped_onto_tab_lines() -> None:
    text = "Job Id: 1.pbs\n    Job_Name = a-very-long-na\n\tme-that-wraps\n    job_state = Q\n    substate = 10\n"
    (job,) = status.parse_qstat(text)
    assert job["name"] == "a-very-long-name-that-wraps"


def test_squeue_gives_running_starting_and_queued_model_jobs() -> None:
    jobs = {job["job_id"]: job for job in status.parse_squeue((DATA / "slurm-squeue.txt").read_text())}
    assert set(jobs) == {"4124701", "4124733", "4124740", "4124741", "4124702"}
    running = jobs["4124701"]
    assert running["state"] == "running" and running["nodes"] == ["gpu017", "gpu018"]
    assert running["started"] == "2024-05-31T10:02:40" and running["estimated_start"] is None
    assert running["elapsed"] == "42:07" and running["walltime"] == "6:00:00" and running["queue"] == "gpu"
    assert jobs["4124733"]["state"] == "starting" and jobs["4124733"]["nodes"] == ["gpu041"]
    pending = jobs["4124740"]
    assert pending["state"] == "queued" and pending["nodes"] == []
    assert pending["started"] is None and pending["estimated_start"] == "2024-05-31T12:15:00"
    assert pending["reason"] == "Priority" and running["reason"] is None
    assert jobs["4124741"]["estimated_start"] is None and jobs["4124741"]["reason"] == "Dependency"
    assert jobs["4124702"]["name"] == "my|job|with|pipes"


def test_scontrol_gives_the_same_entries() -> None:
    jobs = {job["job_id"]: job for job in status.parse_scontrol((DATA / "slurm-scontrol-show-job.txt").read_text())}
    assert set(jobs) == {"4124701", "4124740", "4124733"}
    running = jobs["4124701"]
    assert running["state"] == "running" and running["nodes"] == ["nid008220", "nid008221"]
    assert running["submitted"] == "2024-05-31T10:02:11" and running["started"] == "2024-05-31T10:02:40"
    assert running["walltime"] == "06:00:00" and running["queue"] == "gpu_ss11"
    assert jobs["4124740"]["state"] == "queued" and jobs["4124740"]["estimated_start"] == "2024-05-31T12:15:00"
    assert jobs["4124740"]["nodes"] == [] and jobs["4124740"]["reason"] == "Priority"
    assert running["reason"] is None
    assert jobs["4124733"]["state"] == "starting" and jobs["4124733"]["nodes"] == ["nid008301"]


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("gpu017", ["gpu017"]),
        ("nid[001-003,007]", ["nid001", "nid002", "nid003", "nid007"]),
        ("nid[008220-008221],login1", ["nid008220", "nid008221", "login1"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("", []),
    ],
)
def test_slurm_host_lists_expand(hostlist: str, hosts: list[str]) -> None:
    assert status.expand_hostlist(hostlist) == hosts


def test_status_keeps_only_the_users_jobs_with_the_name_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (DATA / "pbspro-qstat-f.txt").read_text()
    monkeypatch.setattr(status, "_run", lambda command: text)
    report = status.status({"scheduler": "pbspro", "user": "gwuser", "job_name": "parsl.polaris-0."})
    assert report["ok"] and report["scheduler"] == "pbspro" and report["scheduler_error"] is None
    assert [job["job_id"].split(".")[0] for job in report["jobs"]] == ["2148323", "2148331", "2148335", "2148340"]
    assert all("owner" not in job for job in report["jobs"])


def test_a_missing_scheduler_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    report = status.status({"scheduler": "slurm", "user": "nobody", "model_server": {"state_dir": "/nonexistent"}})
    assert report["ok"] and report["jobs"] == [] and report["models"] == []
    assert report["scheduler_error"] and report["scheduler_error"].startswith("slurm:")
