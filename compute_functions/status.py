"""The ``status`` compute function: what this node serves, how loaded it is, and the scheduler's view of the site.

The request (every key optional)::

    {"model_server": {"state_dir": ...},   # where this node's model servers keep their files
     "scheduler": "auto" | "pbspro" | "slurm" | "none",
     "user": "...",                         # whose jobs (default: the worker's user)
     "job_name": "...",                     # only jobs whose name starts with this
     "job_ids": [...],                      # only these jobs (e.g. the blocks an executor submitted)
     "own_job": True}                       # only the batch job this worker runs in (none outside one)

The result::

    {"ok": True, "node": hostname,
     "models": [{"model", "base_url", "running", "waiting", "healthy"}],
     "scheduler": "pbspro" | "slurm" | None,
     "jobs": [{"job_id", "name", "state": "running" | "starting" | "queued", "scheduler_state", "reason", "queue",
               "nodes", "submitted", "started", "estimated_start", "elapsed", "walltime"}],
     "scheduler_error": None | str}

Times are ISO 8601 in the site's local time, as the scheduler prints them. ``reason`` is why a queued job waits,
in the scheduler's words (Slurm: ``Resources``, ``Priority``, ``JobHeldUser``, ...; PBS Pro: its ``comment``).
A job the scheduler no longer knows (finished long enough ago) is left out.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from compute_functions import node
from compute_functions.metrics import ModelLoad, model_load

_COMMAND_TIMEOUT = 30.0

# squeue's fields, '|'-separated; the job name goes last because it is the only one that may hold a '|'.
SQUEUE_FORMAT = "%i|%T|%P|%D|%N|%V|%S|%M|%l|%r|%j"

# PBS Pro substates of a job in state R (src/include/job.h): 40 and 41 are the start handshake with the MoM.
_PBS_STARTING_SUBSTATES = {"40", "41"}
_PBS_QUEUED = set("QHWTSUM")
_SLURM_STATES = {
    "PENDING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "RESV_DEL_HOLD": "queued",
    "SUSPENDED": "queued",
    "STOPPED": "queued",
    "CONFIGURING": "starting",
    "RUNNING": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
}


def status(request: dict[str, Any]) -> dict[str, Any]:
    """The models this node serves with their load, and the site's model jobs; see the module docstring."""
    launch = request.get("model_server") or {}
    models = _served_models(launch.get("state_dir"))
    scheduler = request.get("scheduler") or "auto"
    if request.get("own_job"):
        # A worker knows its own job from the environment the scheduler gives it: no need to know the block ids.
        own = _own_job()
        scheduler = own[0] if own else "none"
        request = {**request, "job_ids": [own[1]] if own else []}
    if scheduler == "auto":
        scheduler = "slurm" if shutil.which("squeue") else "pbspro" if shutil.which("qstat") else "none"
    jobs: list[dict[str, Any]] = []
    error = None
    if scheduler != "none":
        try:
            jobs = _jobs(scheduler, request)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            error = f"{scheduler}: {exc}"
    return {
        "ok": True,
        "node": socket.gethostname(),
        "models": models,
        "scheduler": None if scheduler == "none" else scheduler,
        "jobs": jobs,
        "scheduler_error": error,
    }


def _own_job() -> tuple[str, str] | None:
    """The scheduler and id of the batch job this process runs in."""
    if os.environ.get("SLURM_JOB_ID"):
        return "slurm", os.environ["SLURM_JOB_ID"]
    if os.environ.get("PBS_JOBID"):
        return "pbspro", os.environ["PBS_JOBID"]
    return None


def _served_models(state_dir: str | None) -> list[dict[str, Any]]:
    models = []
    for state in node.servers(state_dir):
        base_url = str(state["base_url"])
        launched_for = state.get("model") or ""
        try:
            with urllib.request.urlopen(f"{base_url.removesuffix('/v1')}/metrics", timeout=5) as answer:
                loads = model_load(answer.read().decode(errors="replace"), launched_for)
            healthy = True
        except (urllib.error.URLError, OSError):
            loads, healthy = {}, False
        for model, load in (loads or {launched_for: ModelLoad()}).items():
            models.append(
                {
                    "model": model,
                    "base_url": base_url,
                    "running": load.running,
                    "waiting": load.waiting,
                    "healthy": healthy,
                }
            )
    return models


def _run(command: list[str], *, gone: str | None = None) -> str:
    """``command``'s output; empty when it fails saying ``gone`` (the job asked for no longer exists)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    if result.returncode != 0 and gone is not None and gone in result.stderr:
        return ""
    if result.returncode != 0:
        raise ValueError(f"{' '.join(command)} exited with {result.returncode}: {result.stderr.strip()[:500]}")
    return result.stdout


def _jobs(scheduler: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    user = request.get("user") or getpass.getuser()
    prefix = request.get("job_name") or ""
    ids = [str(job_id) for job_id in request.get("job_ids") or []]
    if scheduler == "pbspro":
        jobs = parse_qstat(_run(["qstat", "-f", *ids]))
        jobs = [job for job in jobs if ids or job.pop("owner", None) == user]
    elif scheduler == "slurm":
        if ids:
            # Slurm forgets a finished job MinJobAge after it ends (300 s by default); its block is over.
            jobs = [
                job
                for job_id in ids
                for job in parse_scontrol(_run(["scontrol", "show", "job", job_id], gone="Invalid job id specified"))
            ]
        else:
            jobs = parse_squeue(_run(["squeue", "--noheader", "--user", user, f"--format={SQUEUE_FORMAT}"]))
    else:
        raise ValueError(f"unknown scheduler {scheduler!r} (pbspro, slurm or none)")
    for job in jobs:
        job.pop("owner", None)
    return [job for job in jobs if job["name"].startswith(prefix)]


# PBS Pro ------------------------------------------------------------------------------------------------------


def parse_qstat(text: str) -> list[dict[str, Any]]:
    """Jobs from ``qstat -f`` output that are queued, starting or running; finished and exiting ones are left out."""
    jobs = []
    for record in _qstat_records(text):
        state = record.get("job_state", "")
        substate = record.get("substate", "")
        if state == "R":
            ours = "starting" if substate in _PBS_STARTING_SUBSTATES else "running"
        elif state == "B":
            ours = "running"
        elif state in _PBS_QUEUED:
            ours = "queued"
        else:
            continue
        jobs.append(
            {
                "job_id": record["Job Id"],
                "name": record.get("Job_Name", ""),
                "owner": record.get("Job_Owner", "").split("@", 1)[0],
                "state": ours,
                "scheduler_state": f"{state}/{substate}" if substate else state,
                "reason": record.get("comment") if ours == "queued" else None,
                "queue": record.get("queue"),
                "nodes": _pbs_nodes(record.get("exec_host", "")),
                "submitted": _pbs_time(record.get("qtime") or record.get("ctime")),
                "started": _pbs_time(record.get("stime")),
                "estimated_start": _pbs_time(record.get("estimated.start_time")),
                "elapsed": record.get("resources_used.walltime"),
                "walltime": record.get("Resource_List.walltime"),
            }
        )
    return jobs


def _qstat_records(text: str) -> list[dict[str, str]]:
    """``Job Id:`` blocks as attribute dicts; qstat wraps long values onto lines that start with a tab."""
    records: list[dict[str, str]] = []
    record: dict[str, str] | None = None
    key = ""
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            record = {"Job Id": line.split(":", 1)[1].strip()}
            records.append(record)
            key = ""
        elif record is None or not line.strip():
            continue
        elif line.startswith("\t") and key:
            record[key] += line[1:]
        elif " = " in line:
            key, value = line.strip().split(" = ", 1)
            record[key] = value
        elif line.strip().endswith(" ="):
            key = line.strip()[:-2]
            record[key] = ""
    return records


def _pbs_nodes(exec_host: str) -> list[str]:
    # exec_host is host/slot*ncpus joined by '+', one entry per chunk: x3006c0s13b0n0/0*64+x3006c0s13b1n0/0*64
    hosts = (part.split("/", 1)[0] for part in exec_host.split("+") if part)
    return list(dict.fromkeys(hosts))


def _pbs_time(value: str | None) -> str | None:
    if not value:
        return None
    try:
        parsed = time.strptime(value.strip(), "%a %b %d %H:%M:%S %Y")
    except ValueError:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", parsed)


# Slurm --------------------------------------------------------------------------------------------------------


def parse_squeue(text: str) -> list[dict[str, Any]]:
    """Jobs from ``squeue --noheader --format=SQUEUE_FORMAT`` output that are queued, starting or running."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", 10)
        if len(fields) != 11:
            raise ValueError(f"unexpected squeue line: {line!r}")
        job_id, state, partition, _count, nodelist, submitted, started, elapsed, limit, reason, name = fields
        ours = _SLURM_STATES.get(state)
        if ours is None:
            continue
        jobs.append(
            _slurm_job(job_id, name, state, ours, reason, partition, nodelist, submitted, started, elapsed, limit)
        )
    return jobs


def parse_scontrol(text: str) -> list[dict[str, Any]]:
    """Jobs from ``scontrol show job`` output that are queued, starting or running."""
    jobs = []
    for record in _scontrol_records(text):
        state = record.get("JobState", "")
        ours = _SLURM_STATES.get(state)
        if ours is None:
            continue
        jobs.append(
            _slurm_job(
                record.get("JobId", ""),
                record.get("JobName", ""),
                state,
                ours,
                record.get("Reason", ""),
                record.get("Partition", ""),
                record.get("NodeList", ""),
                record.get("SubmitTime", ""),
                record.get("StartTime", ""),
                record.get("RunTime", ""),
                record.get("TimeLimit", ""),
            )
        )
    return jobs


def _scontrol_records(text: str) -> list[dict[str, str]]:
    """Blank-line separated ``Key=Value`` records; a word without '=' continues the previous value."""
    records = []
    for block in re.split(r"\n\s*\n", text.strip()):
        record: dict[str, str] = {}
        key = ""
        for word in block.split():
            name, equals, value = word.partition("=")
            if equals and name and (name[0].isupper() or "/" in name or ":" in name):
                key = name
                record[key] = value
            elif key:
                record[key] += " " + word
        if "JobId" in record:
            records.append(record)
    return records


def _slurm_job(
    job_id: str,
    name: str,
    state: str,
    ours: str,
    reason: str,
    partition: str,
    nodelist: str,
    submitted: str,
    started: str,
    elapsed: str,
    limit: str,
) -> dict[str, Any]:
    running = ours != "queued"
    start = _slurm_time(started)
    return {
        "job_id": job_id,
        "name": name,
        "state": ours,
        "scheduler_state": state,
        "reason": reason if reason and reason not in ("None", "(null)") else None,
        "queue": partition or None,
        "nodes": expand_hostlist(nodelist) if running and nodelist not in ("", "(null)") else [],
        "submitted": _slurm_time(submitted),
        "started": start if running else None,
        # A pending job's start time is the scheduler's estimate, when it has one.
        "estimated_start": None if running else start,
        "elapsed": elapsed or None,
        "walltime": limit if limit and limit not in ("UNLIMITED", "NOT_SET") else None,
    }


def _slurm_time(value: str) -> str | None:
    return value if re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$", value or "") else None


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list (``nid[001-003,007],login1``) as host names."""
    hosts: list[str] = []
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        hosts.extend(_expand_one(part))
    return hosts


def _expand_one(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = []
    for item in match.group(1).split(","):
        low, _, high = item.partition("-")
        width = len(low)
        for number in range(int(low), int(high or low) + 1):
            names.extend(_expand_one(f"{head}{number:0{width}d}{tail}"))
    return names
