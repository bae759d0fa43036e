"""The model servers of one node, shared by every worker process on it.

A server is known by a key made from its launch settings (command template, model, host, port, environment).
Its files sit in a node-local directory:

    KEY.lock      flock'd while the server is launched or stopped, and while its state changes
    KEY.json      its state: starting, ready or failed; its address; the watchdog's and the server's pids;
                  the launch settings
    KEY.log       the server's output
    KEY.used      touched when a request starts and ends; its mtime is the last use
    KEY.clients/  one empty file per worker process that used the server, named by its pid

A small watchdog process per server, detached from the worker that launched it, owns the server: it starts it,
records when it is healthy, and stops its whole process group once it has been idle for ``idle_timeout``, or once
no worker process that used it is alive, so that a server never outlives the worker pool that asked for it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compute_functions.locks import held
from compute_functions.metrics import model_load
from compute_functions.model_server import ModelServer, ModelServerFailed, free_port, health_check, pause, tail
from compute_functions.processes import alive

# The directory that holds the ``compute_functions`` package, so the watchdog imports the same code.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_WATCHDOG = (
    "import sys; sys.path.insert(0, sys.argv[1]); from compute_functions.node import watch; watch(*sys.argv[2:])"
)
# How long a request waits for the lock beyond the server's startup time (a stop can hold it for ~15 s).
_LOCK_MARGIN = 30.0

# Base URLs of the servers this worker process has already found ready, by state file: the common case skips
# the lock.
_ready: dict[Path, str] = {}
_files: dict[tuple[str, str], _Files] = {}
# When each server's ``.used`` file was last touched by this process, and how often it is touched at most.
_marked: dict[Path, float] = {}
_MARK_EVERY = 0.5
_watchdogs: list[subprocess.Popen[bytes]] = []


def default_state_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"inference-gateway-{os.getuid()}" / "servers"


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one model server on this node; built from a request's ``model_server`` settings."""

    command: tuple[str, ...]
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    health_path: str = "/health"
    startup_timeout: float = 600.0
    idle_timeout: float = 1800.0
    env: Mapping[str, str] = field(default_factory=dict)
    state_dir: str = ""

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], model: str) -> LaunchSpec:
        command = tuple(str(part) for part in settings["command"])
        return cls(
            command=command,
            # A template without {model} serves every model of the endpoint from one server.
            model=model if any("{model}" in part for part in command) else "",
            host=str(settings.get("host") or "127.0.0.1"),
            port=int(settings.get("port") or 0),
            health_path=str(settings.get("health_path") or "/health"),
            startup_timeout=float(settings.get("startup_timeout") or 600.0),
            idle_timeout=float(settings.get("idle_timeout") or 1800.0),
            env={str(k): str(v) for k, v in (settings.get("env") or {}).items()},
            state_dir=str(settings.get("state_dir") or default_state_dir()),
        )

    @functools.cached_property
    def key(self) -> str:
        identity = [list(self.command), sys.executable, self.model, self.host, self.port, sorted(self.env.items())]
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:12]
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model or Path(self.command[0]).name).strip("-.")
        return f"{readable[:60]}-{digest}"


@dataclass(frozen=True)
class _Files:
    directory: Path
    key: str

    def path(self, suffix: str) -> Path:
        return self.directory / f"{self.key}{suffix}"

    @property
    def lock(self) -> Path:
        return self.path(".lock")

    @functools.cached_property
    def state(self) -> Path:
        return self.path(".json")

    @property
    def log(self) -> Path:
        return self.path(".log")

    @functools.cached_property
    def used(self) -> Path:
        return self.path(".used")

    @property
    def clients(self) -> Path:
        return self.path(".clients")


def _files_of(spec: LaunchSpec) -> _Files:
    # A request server asks about the same few servers thousands of times a second: their paths are made once.
    files = _files.get((spec.state_dir, spec.key))
    if files is None:
        files = _files[(spec.state_dir, spec.key)] = _Files(Path(spec.state_dir), spec.key)
    return files


def ensure_server(spec: LaunchSpec) -> str:
    """The base URL (``http://host:port/v1``) of ``spec``'s server, launched first if none is running.

    Raises ``ModelServerFailed``, with the end of the server's log, when it cannot be started.
    """
    files = _files_of(spec)
    base_url = _ready.get(files.state)
    if base_url is None:
        base_url = _acquire(spec, files)
        _ready[files.state] = base_url
    mark_used(spec)
    return base_url


def known_server(spec: LaunchSpec) -> str | None:
    """The base URL of ``spec``'s server if this process found it ready before (then marked used), else None."""
    base_url = _ready.get(_files_of(spec).state)
    if base_url is not None:
        mark_used(spec)
    return base_url


def forget(spec: LaunchSpec) -> None:
    """Stop trusting the remembered address of ``spec``'s server (it refused a connection)."""
    _ready.pop(_files_of(spec).state, None)


def mark_used(spec: LaunchSpec) -> None:
    used = _files_of(spec).used
    # The watchdog measures idleness in minutes; marking more often than this costs a system call per request.
    now = time.monotonic()
    if now - _marked.get(used, float("-inf")) < _MARK_EVERY:
        return
    _marked[used] = now
    try:
        os.utime(used)
    except FileNotFoundError:
        used.touch()


def servers(state_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The states of the servers on this node that are ready and watched."""
    directory = Path(state_dir) if state_dir else default_state_dir()
    found = []
    for path in sorted(directory.glob("*.json")):
        state = _read(path)
        if state and state.get("status") == "ready" and alive(state.get("watchdog")):
            found.append(state)
    return found


def launch(spec: LaunchSpec) -> None:
    """Start ``spec``'s server unless one runs or starts already, without waiting for it to be ready.

    For whoever will ask ``ensure_server`` soon and has other things to start meanwhile. Never raises: a server that
    cannot start is reported by ``ensure_server``.
    """
    # One try for the lock: whoever holds it is starting or stopping the server, and will be waited for later.
    with contextlib.suppress(OSError, ModelServerFailed):
        _claim(spec, _files_of(spec), time.monotonic())


def _claim(spec: LaunchSpec, files: _Files, deadline: float) -> str | None:
    """Make sure ``spec``'s server runs or starts, and count this process among its users.

    Returns the base URL of a server that someone else started and keeps (which this one must never stop).
    """
    files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _watchdogs[:] = [child for child in _watchdogs if child.poll() is None]
    with locked(files.lock, deadline):
        state = _read(files.state)
        if state is None or state.get("status") == "failed" or not alive(state.get("watchdog")):
            if spec.port and health_check(f"http://{spec.host}:{spec.port}{spec.health_path}"):
                # Started by someone else (an operator's long-running vLLM): use it, never stop it.
                return f"http://{spec.host}:{spec.port}/v1"
            _launch(spec, files)
        files.clients.mkdir(exist_ok=True)
        (files.clients / str(os.getpid())).touch()
    return None


def _acquire(spec: LaunchSpec, files: _Files) -> str:
    began = time.monotonic()
    deadline = began + spec.startup_timeout + _LOCK_MARGIN
    external = _claim(spec, files, deadline)
    if external is not None:
        return external
    while True:
        state = _read(files.state)
        if state is not None and state.get("status") == "ready":
            return str(state["base_url"])
        if state is not None and state.get("status") == "failed":
            raise ModelServerFailed(str(state.get("error")))
        if state is None or not alive(state.get("watchdog")):
            raise ModelServerFailed(f"the model server's watchdog stopped; its log ends with:\n{tail(files.log)}")
        if time.monotonic() > deadline:
            raise ModelServerFailed(
                f"model server not healthy after {spec.startup_timeout:.0f} s; its log ends with:\n{tail(files.log)}"
            )
        time.sleep(pause(time.monotonic() - began))


def _launch(spec: LaunchSpec, files: _Files) -> dict[str, Any]:
    port = spec.port or free_port(spec.host)
    files.log.unlink(missing_ok=True)
    state: dict[str, Any] = {
        "status": "starting",
        "key": spec.key,
        "model": spec.model,
        "host": spec.host,
        "port": port,
        "base_url": f"http://{spec.host}:{port}/v1",
        "log": str(files.log),
        "started": time.time(),
        "launch": {**asdict(spec), "command": list(spec.command), "env": dict(spec.env)},
    }
    _write(files.state, state)
    files.used.touch()
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, PACKAGE_ROOT, str(files.directory), spec.key],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _watchdogs.append(watchdog)
    state["watchdog"] = watchdog.pid
    _write(files.state, state)
    return state


class _Stop(Exception):
    pass


def _stop_on_signal(signum: int, frame: object) -> None:
    raise _Stop


def watch(directory: str, key: str) -> None:
    """The watchdog's body: run the server described in ``KEY.json`` until it is idle or unused, then stop it."""
    files = _Files(Path(directory), key)
    state = _read(files.state)
    if state is None:
        return
    launch = state["launch"]
    server = ModelServer(
        launch["command"],
        host=state["host"],
        port=state["port"],
        health_path=launch["health_path"],
        env=launch["env"],
        log_path=files.log,
        model=launch["model"],
    )
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    reason = "stopped by a signal"
    try:
        try:
            server.start(timeout=float(launch["startup_timeout"]))
        except ModelServerFailed as exc:
            _update(files, status="failed", error=str(exc))
            return
        assert server.process is not None
        # The server leads its own process group; everything it started goes with it.
        _update(files, status="ready", server=server.process.pid)
        idle_timeout = float(launch["idle_timeout"])
        poll = min(1.0, idle_timeout / 4)
        while True:
            time.sleep(poll)
            if not server.running():
                error = f"model server exited with status {server.process and server.process.returncode}"
                _update(files, status="failed", error=f"{error}; its log ends with:\n{tail(files.log)}")
                return
            why = _reason_to_stop(files, state["base_url"], idle_timeout)
            if why:
                reason = why
                break
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            with locked(files.lock, float("inf")):
                if server.running():
                    with open(files.log, "ab") as log:
                        log.write(f"\n[watchdog] stopping the model server: {reason}\n".encode())
                server.stop()
                current = _read(files.state)
                if current is not None and current.get("watchdog") == os.getpid() and current.get("status") != "failed":
                    files.state.unlink(missing_ok=True)
                    files.used.unlink(missing_ok=True)
                    for client in files.clients.glob("*"):
                        client.unlink(missing_ok=True)
        finally:
            # Whatever happened to the files (a directory removed under it), the server must not outlive this.
            server.stop()


def _reason_to_stop(files: _Files, base_url: str, idle_timeout: float) -> str | None:
    users = 0
    for client in files.clients.glob("*"):
        if client.name.isdigit() and alive(int(client.name)):
            users += 1
        else:
            client.unlink(missing_ok=True)
    if users == 0:
        return "no worker process uses it any more"
    try:
        idle = time.time() - files.used.stat().st_mtime
    except FileNotFoundError:
        idle = idle_timeout + 1
    if idle > idle_timeout and not _busy(base_url.removesuffix("/v1")):
        return f"idle for {idle:.0f} s"
    return None


def _busy(root_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{root_url}/metrics", timeout=2) as answer:
            text = answer.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return False
    return any(load.running or load.waiting for load in model_load(text).values())


@contextlib.contextmanager
def locked(path: Path, deadline: float) -> Iterator[None]:
    """Hold the lock file ``path``; ``ModelServerFailed`` when another process holds it past ``deadline``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with held(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), deadline) as owned:
        if not owned:
            raise ModelServerFailed(f"timed out waiting for {path} (another worker holds it)")
        yield


def _read(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def _write(path: Path, state: dict[str, Any]) -> None:
    # Readers never take the lock, so the file is replaced whole, never rewritten in place.
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(state))
    os.replace(partial, path)


def _update(files: _Files, **changes: Any) -> None:
    with locked(files.lock, float("inf")):
        state = _read(files.state)
        if state is not None and state.get("watchdog") in (None, os.getpid()):
            _write(files.state, {**state, **changes})
