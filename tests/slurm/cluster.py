"""A single-node Slurm cluster from Debian's packages, started for the tests and stopped after them.

Everything lives in one folder: configuration, state, spool, logs, pid files, and a munged of its own with its own
key and socket. The daemons listen on free loopback ports, so nothing clashes with a site's Slurm or with another
run. Whatever talks to the cluster (the client commands, Parsl's ``SlurmProvider``, a worker's ``squeue``) needs
``SLURM_CONF`` from ``cluster.env``; jobs inherit it from ``sbatch``.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compute_functions.model_server import free_port

INSTALL = "sudo bash tests/slurm/slurm_env.sh (apt-get install slurmctld slurmd slurm-client munge)"
# The daemons live in sbin, which an ordinary user's PATH may lack.
_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
_DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


@dataclass(frozen=True)
class Job:
    """A line of ``squeue``: what the tests look at."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    reason: str  # why it waits (Resources, Priority, JobHeldUser, ...); None when it runs or is not yet looked at
    start: str  # when it started, or for a pending job the estimated start (N/A when there is none)
    name: str


def _command(name: str) -> str:
    found = shutil.which(name, path=_PATH)
    if found is None:
        raise RuntimeError(f"{name} is not installed; the Slurm tests need it: {INSTALL}")
    return found


class SlurmCluster:
    """A running single-node cluster with one partition; ``start`` and ``stop`` are written once, here.

    ``env`` is what a process needs to use the cluster; ``submit`` queues a batch job and ``occupied`` holds every
    core of the node with a job, so that the next job waits (PENDING, reason ``Resources``).
    """

    partition = "debug"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf), "PATH": _PATH}
        self.cpus = 0
        self._commands = {name: _command(name) for name in (*_DAEMONS, *_CLIENTS)}
        self._pid_files: list[Path] = []

    # Start and stop ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start munged, slurmctld and slurmd; return when the node takes jobs."""
        root = self.root
        for folder in ("etc", "state", "spool", "log", "run", "munge"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket folder that others cannot traverse, and the key must be private.
        root.chmod(0o755)
        (root / "munge").chmod(0o711)
        self._munge()
        self.conf.write_text(self._config())
        env = {**os.environ, **self.env}
        self._daemon([self._commands["slurmctld"], "-f", str(self.conf)], env, root / "run" / "slurmctld.pid")
        self._daemon([self._commands["slurmd"], "-f", str(self.conf)], env, root / "run" / f"slurmd.{self.node}.pid")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            done = self._client("sinfo", "--noheader", "--format=%T", check=False)
            state = done.stdout.strip()
            if done.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the Slurm node is not idle after {timeout:g} s (sinfo: {state!r}){self._log_tails()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, wait until the queue is empty, then stop the daemons by their pids."""
        try:
            if self._pid_files:
                self._client("scancel", f"--user={getpass.getuser()}", check=False)
                deadline = time.monotonic() + timeout
                # A job still running when slurmd goes would leave its processes behind.
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.2)
                left = self.jobs()
                if left:
                    raise RuntimeError(f"jobs still in the queue {timeout:g} s after scancel: {left}")
        finally:
            for pid_file in reversed(self._pid_files):
                _terminate(pid_file)
            self._pid_files.clear()

    def _munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([self._commands["mungekey"], "--create", f"--keyfile={key}"], check=True)
            key.chmod(0o600)
        munge = self.root / "munge"
        command = [
            self._commands["munged"],
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket.2'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        ]
        self._daemon(command, dict(os.environ), munge / "munged.pid")

    def _daemon(self, command: list[str], env: dict[str, str], pid_file: Path) -> None:
        """Run a daemon that forks into the background and writes ``pid_file``; wait for the file."""
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} exited with {done.returncode}: {done.stderr.strip()}{self._log_tails()}")
        self._pid_files.append(pid_file)
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} wrote no pid file {pid_file}{self._log_tails()}")
            time.sleep(0.05)

    @property
    def node(self) -> str:
        return socket.gethostname().split(".", 1)[0]

    def _config(self) -> str:
        root, user = self.root, getpass.getuser()
        # slurmd -C describes this machine as Slurm sees it (CPUs, sockets, cores, memory).
        hardware = subprocess.run(
            [self._commands["slurmd"], "-C"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        self.cpus = int(next(word for word in hardware.split() if word.startswith("CPUs=")).split("=", 1)[1])
        return f"""\
ClusterName=testcluster
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd.%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
MpiDefault=none
# Plain process tracking: the cgroup plugins would leave folders under /sys/fs/cgroup.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# A pending job gets its estimated start from the backfill pass: run it every second, not every 30.
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{hardware} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _log_tails(self) -> str:
        tails = []
        for log in sorted((self.root / "log").glob("*.log")):
            tails.append(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "".join(tails)

    # Using the cluster ---------------------------------------------------------------------------------------

    def _client(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self._commands[name], *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
        return done

    def run(self, name: str, *args: str) -> str:
        """The output of the client command ``name`` (``squeue``, ``scontrol``, ...) run against this cluster."""
        return self._client(name, *args).stdout

    def submit(self, *options: str, command: str = "sleep 600") -> str:
        """Queue ``command`` as a batch job with ``sbatch`` ``options``; its job id."""
        output = self.run(
            "sbatch",
            "--parsable",
            f"--partition={self.partition}",
            f"--output={self.root / 'log' / 'job-%j.out'}",
            *options,
            f"--wrap={command}",
        )
        return output.strip().split(";", 1)[0]

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id)

    def jobs(self, *, ended: bool = False) -> list[Job]:
        """The jobs in the queue (pending, running, completing); with ``ended``, also those that ended less than
        MinJobAge (30 s) ago, in their final state (COMPLETED, CANCELLED, FAILED, ...)."""
        states = ["--states=all"] if ended else []
        output = self._client("squeue", "--noheader", "--format=%i|%T|%r|%S|%j", *states, check=False).stdout
        return [Job(*line.split("|", 4)) for line in output.splitlines() if line.strip()]

    def job(self, job_id: str, *, ended: bool = False) -> Job | None:
        return next((job for job in self.jobs(ended=ended) if job.job_id == job_id), None)

    def wait_for(self, job_id: str, state: str | None, timeout: float = 30.0) -> Job | None:
        """Wait until ``job_id`` is in ``state`` (``None``: gone from the queue); the job as last seen."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if (job.state if job else None) == state:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {job} after {timeout:g} s, not {state}")
            time.sleep(0.2)

    def wait_until_considered(self, job_id: str, timeout: float = 15.0) -> Job:
        """Wait until the scheduler has looked at pending ``job_id`` (a new job waits with reason None at first) and,
        unless it is held, estimated its start; the job as then seen."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            assert job is not None and job.state == "PENDING", f"job {job_id} is {job}, not PENDING"
            if job.reason != "None" and (job.start != "N/A" or "Held" in job.reason):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"the scheduler has not considered job {job_id} after {timeout:g} s: {job}")
            time.sleep(0.2)

    @contextmanager
    def occupied(self, minutes: int = 10) -> Iterator[str]:
        """A running job that holds every core of the node, so that the next job waits; cancelled at the end.

        Its time limit gives the jobs behind it an estimated start.
        """
        job_id = self.submit(f"--cpus-per-task={self.cpus}", f"--time={minutes}", "--job-name=occupier")
        try:
            self.wait_for(job_id, "RUNNING")
            yield job_id
        finally:
            if self.job(job_id) is not None:
                self.cancel(job_id)
                self.wait_for(job_id, None)


def _terminate(pid_file: Path, timeout: float = 10.0) -> None:
    """SIGTERM the daemon whose pid ``pid_file`` holds, then SIGKILL it if it lingers."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
