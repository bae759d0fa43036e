"""Starting, watching and stopping one model server process (vLLM, or the simulator)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from compute_functions.processes import group_alive


class ModelServerFailed(RuntimeError):
    """The model server did not start or died; the message carries the end of its log."""


def health_check(url: str) -> bool:
    """Whether the server answers ``url`` (its health path) with 200 within two seconds."""
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def pause(waited: float) -> float:
    """How long to wait before asking again whether a server that has been starting for ``waited`` seconds is up.

    Often at first, since the simulator is up in a fraction of a second and a first request waits on it; then
    every 0.1 s, since vLLM takes minutes and each look costs a connection or a file read.
    """
    return 0.01 if waited < 2.0 else 0.1


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of the log at ``path``, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ModelServer:
    """One model server started from a command template, in its own process group.

    The template's ``{python}``, ``{host}``, ``{port}`` and ``{model}`` are filled in. The
    whole process group is stopped, because servers such as vLLM leave engine
    processes behind when only the parent is killed.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health_path: str = "/health",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        model: str = "",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        values = {"python": sys.executable, "host": host, "port": str(self.port), "model": model}
        self.command = [part.format(**values) for part in command]
        self.health_url = f"http://{host}:{self.port}{health_path}"
        self.env = dict(env or {})
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"model-server-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until it answers its health check, or raise ``ModelServerFailed``."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,
            )
        began = time.monotonic()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelServerFailed(
                    f"model server exited with status {self.process.returncode} while starting "
                    f"({shlex.join(self.command)}); its log ends with:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(pause(time.monotonic() - began))
        self.stop()
        raise ModelServerFailed(
            f"model server not healthy after {timeout:.0f} s; its log ends with:\n{self.log_tail()}"
        )

    def healthy(self) -> bool:
        return health_check(self.health_url)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return
        group = self.process.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()
                if not group_alive(group):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        self.process.poll()
        self.process = None
