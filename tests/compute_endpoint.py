"""The real ``globus-compute-endpoint`` daemon, configured from the project's operator templates.

``EndpointDaemon`` does what docs/operator-guide.md tells an operator to do:
copy the three files of ``endpoint_configs/globus-compute/<site>/`` with every
``CHANGE-ME`` filled in, ``globus-compute-endpoint configure`` with them, then
``start`` (in the foreground, as a process of its own session) and ``stop``.
Everything the daemon writes stays in a folder of the test (``HOME`` and
``GLOBUS_COMPUTE_USER_DIR``); it logs in to the local service with client
credentials, as the gateway does.

Two settings differ from the templates, for the tests' time: heartbeats every
5 s (the endpoint's minimum) and ``idle_heartbeats_soft`` of the caller's choosing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from tests.support import REPO

TEMPLATES = REPO / "endpoint_configs" / "globus-compute"
BIN = Path(sys.executable).parent
CLIENT_ID = "5a1ee7c4-0000-4000-8000-00000000c0de"
CLIENT_SECRET = "local-compute-secret"
HEARTBEAT = 5


def credentials() -> dict[str, str]:
    """The gateway's and the endpoint's Globus identity: the same confidential client, as in the guide."""
    return {"GLOBUS_COMPUTE_CLIENT_ID": CLIENT_ID, "GLOBUS_COMPUTE_CLIENT_SECRET": CLIENT_SECRET}


def fill(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``CHANGE-ME...`` placeholder replaced; a placeholder left over is an error."""
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    left = re.findall(r"^[^#\n]*CHANGE-ME\S*", text, flags=re.MULTILINE)
    assert not left, f"placeholders not filled: {left}"
    return text


class EndpointDaemon:
    """One endpoint daemon, ``name``, made from the ``site`` template under ``folder``; see the module docstring."""

    def __init__(
        self,
        name: str,
        folder: Path,
        service_env: dict[str, str],
        *,
        site: str = "local",
        idle_heartbeats: int = 120,
        allowed_functions: list[str] | None = None,
        email: str = "operator@example.org",
        values: dict[str, str] | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.folder = folder
        self.site = site
        self.idle_heartbeats = idle_heartbeats
        self.allowed_functions = allowed_functions
        self.email = email
        self.values = {
            "CHANGE-ME-local-inference": f"{name} (tests)",
            "CHANGE-ME-cluster-inference": f"{name} (tests)",
            "CHANGE-ME@example.org": email,
            "CHANGE-ME/inference-env": sys.prefix,
            **(values or {}),
        }
        # Added to user_environment.yaml: what the user endpoint needs beyond the template (a cluster's SLURM_CONF).
        self.environment = environment or {}
        self.home = folder / "home"
        self.user_dir = folder / ".globus_compute"
        self.log_path = folder / "daemon.log"
        self.env = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home),
            "GLOBUS_COMPUTE_USER_DIR": str(self.user_dir),
            "LANG": "C.UTF-8",
            **service_env,
            **credentials(),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint_id: str | None = None
        # The sessions of the user endpoints seen: their Parsl workers are not the daemon's descendants once
        # the launching shell has exited, but they stay in the user endpoint's session.
        self.sessions: set[int] = set()

    @property
    def endpoint_dir(self) -> Path:
        return self.user_dir / self.name

    def command(self, *args: str, timeout: float = 60) -> str:
        """``globus-compute-endpoint ARGS`` in the daemon's environment; its output."""
        done = subprocess.run(
            [str(BIN / "globus-compute-endpoint"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.folder,
        )
        assert done.returncode == 0, f"globus-compute-endpoint {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def configure(self) -> EndpointDaemon:
        """``globus-compute-endpoint configure`` with the site's three files, filled in."""
        self.home.mkdir(parents=True, exist_ok=True)
        filled = self.folder / "templates"
        filled.mkdir(exist_ok=True)
        site = TEMPLATES / self.site
        core = fill((site / "config.yaml").read_text(), self.values)
        # The daemon's own settings for a test: the local service, and heartbeats often enough to follow.
        core += f"\nlocal_compute_services: true\nheartbeat_period: {HEARTBEAT}\n"
        if self.allowed_functions is not None:
            core += "allowed_functions:\n" + "".join(f"  - {function}\n" for function in self.allowed_functions)
        template = fill((site / "user_config_template.yaml.j2").read_text(), self.values)
        template = re.sub(r"(?m)^heartbeat_period: \d+", f"heartbeat_period: {HEARTBEAT}", template)
        template = re.sub(r"(?m)^idle_heartbeats_soft: \d+", f"idle_heartbeats_soft: {self.idle_heartbeats}", template)
        environment = fill((site / "user_environment.yaml").read_text(), self.values)
        # A daemon run as root clears the user endpoint's environment: keep its files in the test's folder.
        environment += f"GLOBUS_COMPUTE_USER_DIR: {self.user_dir}\n"
        environment += "".join(f"{name}: {value}\n" for name, value in self.environment.items())
        for file_name, text in [
            ("config.yaml", core),
            ("user_config_template.yaml.j2", template),
            ("user_environment.yaml", environment),
        ]:
            (filled / file_name).write_text(text)
        self.command(
            "configure",
            # No identity mapping: user endpoints only for the daemon's own identity, also as root.
            "--multi-user",
            "false",
            "--contact-email",
            self.email,
            "--core-config",
            str(filled / "config.yaml"),
            "--template-config",
            str(filled / "user_config_template.yaml.j2"),
            "--user-env-config",
            str(filled / "user_environment.yaml"),
            self.name,
        )
        return self

    def start(self, timeout: float = 60) -> str:
        """``globus-compute-endpoint start``; the endpoint's id once the daemon has registered."""
        assert self.process is None or self.process.poll() is not None, "already running"
        # The daemon writes endpoint.json once registered, on every start; the id stays the same across starts.
        json_file = self.endpoint_dir / "endpoint.json"
        launched = time.time_ns()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "globus-compute-endpoint"), "start", self.name],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not (json_file.exists() and json_file.stat().st_mtime_ns >= launched):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the endpoint daemon did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        self.endpoint_id = str(json.loads(json_file.read_text())["endpoint_id"])
        return self.endpoint_id

    def processes(self) -> list[psutil.Process]:
        """The daemon, everything it started, and what still runs in its user endpoints' sessions."""
        found: list[psutil.Process] = []
        if self.process is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                daemon = psutil.Process(self.process.pid)
                found = [daemon, *daemon.children(recursive=True)]
        for process in found[1:]:
            with contextlib.suppress(ProcessLookupError):
                if os.getsid(process.pid) == process.pid:
                    self.sessions.add(process.pid)
        known = {process.pid for process in found}
        for process in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if process.pid in known or os.getsid(process.pid) not in self.sessions:
                    continue
                # A session id could be reused once its session has ended: only what runs from this folder
                # (the worker pool), with the worker processes it spawned.
                if str(self.folder) in " ".join(process.cmdline()):
                    found.extend(p for p in [process, *process.children(recursive=True)] if p.pid not in known)
                    known.update(p.pid for p in found)
        return found

    def user_endpoint_processes(self) -> list[psutil.Process]:
        """The user endpoint processes: the daemon's direct children."""
        if self.process is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            return list(psutil.Process(self.process.pid).children())
        return []

    def kill(self) -> None:
        """SIGKILL the daemon alone, as a crash would; its user endpoint notices on its own."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 60) -> None:
        """``globus-compute-endpoint stop``, then make sure that nothing it started is left."""
        started = self.processes()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.command("stop", self.name, timeout=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        started += self.processes()
        _gone, alive = psutil.wait_procs(started, timeout=20)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                os.kill(process.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)

    def log_tail(self, lines: int = 60) -> str:
        texts = []
        for path in [self.log_path, self.endpoint_dir / "endpoint.log"]:
            if path.exists():
                texts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)


REGISTRY = """\
# The gateway's registry of the local Globus Compute site, as docs/operator-guide.md step 4 writes it.
endpoints:
  - cluster: {cluster}
    framework: vllm
    models: [{model}]
    transport: globus
    globus:
      endpoint_id: {endpoint_id}
      # function_ids are written by `inference-gateway register-functions`
    worker_model_server:
      command: {command}
      startup_timeout: 60
      state_dir: {state_dir}
"""


class ComputeSite:
    """An endpoint daemon with the gateway's functions registered and allowed, as the operator guide sets it up.

    Steps 2 to 5: configure and start the endpoint to learn its id, write the
    registry entry, ``inference-gateway register-functions``, paste the
    ``allowed_functions`` block it prints into ``config.yaml``, restart.
    """

    def __init__(self, daemon: EndpointDaemon, cluster: str, model: str, command: list[str], state_dir: Path) -> None:
        self.daemon = daemon
        self.cluster = cluster
        self.model = model
        self.command = command
        self.state_dir = state_dir
        self.registry = daemon.folder / "registry.yaml"
        self.function_ids: dict[str, str] = {}
        self.printed = ""

    @property
    def endpoint_id(self) -> str:
        assert self.daemon.endpoint_id is not None
        return self.daemon.endpoint_id

    def set_up(self) -> ComputeSite:
        self.daemon.configure()
        self.daemon.start()
        self.daemon.stop()
        self.registry.write_text(
            REGISTRY.format(
                cluster=self.cluster,
                model=self.model,
                endpoint_id=self.endpoint_id,
                command=json.dumps(self.command),
                state_dir=self.state_dir,
            )
        )
        done = subprocess.run(
            [str(BIN / "inference-gateway"), "register-functions", "--config", str(self.registry)],
            env={**os.environ, **self.daemon.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"register-functions failed:\n{done.stdout}\n{done.stderr}"
        self.printed = done.stdout
        block = done.stdout[done.stdout.index("allowed_functions:") :]
        with open(self.daemon.endpoint_dir / "config.yaml", "a") as config:
            config.write("\n" + block)
        entry = yaml.safe_load(self.registry.read_text())["endpoints"][0]
        self.function_ids = {name: str(value) for name, value in entry["globus"]["function_ids"].items()}
        registered = self.endpoint_id
        assert self.daemon.start() == registered, "the endpoint came back under another id"
        return self

    def endpoint(self, **extra: object) -> dict[str, object]:
        """The registry entry, with its written ``function_ids``, for a gateway config."""
        entry: dict[str, object] = yaml.safe_load(self.registry.read_text())["endpoints"][0]
        return {**entry, **extra}

    def warm_up(self, attempts: int = 2) -> None:
        """Run the ``status`` function once through the real SDK, so that the user endpoint and its workers run.

        A user endpoint that a just-restarted daemon left without workers answers nothing: after two minutes the
        daemon is stopped and started again, and the function tried once more.
        """
        from globus_compute_sdk import Client, Executor

        saved = {name: os.environ.get(name) for name in self.daemon.env}
        os.environ.update(self.daemon.env)
        try:
            for attempt in range(attempts):
                executor = Executor(endpoint_id=self.endpoint_id, client=Client())
                request = {"model_server": {"state_dir": str(self.state_dir)}, "scheduler": "none"}
                try:
                    executor.submit_to_registered_function(self.function_ids["status"], args=(request,)).result(
                        timeout=120
                    )
                    return
                except TimeoutError:
                    # What the daemon and its user endpoint said, for the report of a test that fails here.
                    for log in sorted(self.daemon.endpoint_dir.rglob("*.log")):
                        lines = log.read_text(errors="replace").splitlines()[-40:]
                        print(f"--- {log} (end)", *lines, sep="\n", file=sys.stderr)
                    if attempt == attempts - 1:
                        raise
                    self.daemon.stop()
                    (self.daemon.endpoint_dir / "daemon.pid").unlink(missing_ok=True)
                    self.daemon.start()
                finally:
                    # Not waiting: a task that never answers would hold the shutdown forever.
                    executor.shutdown(wait=False, cancel_futures=True)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
