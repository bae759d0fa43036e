"""A real vLLM server on the CPU, serving a tiny random-weight Llama, for the end-to-end tests.

``tests/e2e/vllm_env.sh`` builds the virtualenv and the model (``make vllm-env`` runs it before pytest; the fixture
runs it too, so ``pytest tests/e2e`` works alone). Settings, all optional:

    INFERENCE_GATEWAY_VLLM_VENV           the vLLM virtualenv (default REPO/.venv-vllm)
    INFERENCE_GATEWAY_VLLM_MODEL_DIR      the model directory (default REPO/.cache/tiny-llama)
    INFERENCE_GATEWAY_VLLM_START_TIMEOUT  seconds to wait for /health (default 300)
    INFERENCE_GATEWAY_VLLM_ARGS           extra server arguments, shell-quoted
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.support import TOKEN, api_url, direct_config, endpoint, gateway

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ENV_SCRIPT = HERE / "vllm_env.sh"

SERVED_MODEL = "facebook/opt-125m"
BUILD_TIMEOUT = 1800.0
STOP_GRACE = 20.0
# Covers a first build of the virtualenv plus a server start, which pytest-timeout counts against the first test.
E2E_TEST_TIMEOUT = 2400

E2E_MARKER = "e2e: end-to-end tests against a real vLLM on the CPU"


@dataclass(frozen=True)
class VllmServer:
    base_url: str
    model: str
    port: int
    host: str
    pid: int
    log_path: Path
    api_key: str = "EMPTY"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", E2E_MARKER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timeout_plugin = config.pluginmanager.hasplugin("timeout")
    for item in items:
        if HERE not in Path(item.path).resolve().parents:
            continue
        item.add_marker(pytest.mark.e2e)
        if timeout_plugin and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(E2E_TEST_TIMEOUT))


def _venv_dir() -> Path:
    return Path(os.environ.get("INFERENCE_GATEWAY_VLLM_VENV") or REPO / ".venv-vllm")


def _model_dir() -> Path:
    return Path(os.environ.get("INFERENCE_GATEWAY_VLLM_MODEL_DIR") or REPO / ".cache" / "tiny-llama")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ensure_environment(log_path: Path) -> Path:
    """Build or confirm the virtualenv and the model (the script is quick when both are there); return the python."""
    python = _venv_dir() / "bin" / "python"
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            result = subprocess.run(
                ["bash", str(ENV_SCRIPT)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{ENV_SCRIPT} did not finish in {BUILD_TIMEOUT:.0f} s; its log ends with:\n{_tail(log_path)}",
            pytrace=False,
        )
    if result.returncode != 0 or not python.exists():
        pytest.fail(
            f"could not build the vLLM environment (exit {result.returncode} of {ENV_SCRIPT} after "
            f"{time.monotonic() - started:.0f} s); its log ends with:\n{_tail(log_path)}",
            pytrace=False,
        )
    return python


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _server_env(venv: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"):
        env.pop(name, None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # Nothing may be fetched: no model hub, no usage reports.
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    # One OpenMP thread is plenty for the tiny model and leaves the other core to pytest and the gateway. vLLM's
    # automatic binding pins by NUMA topology and reserves a core, which on a 2-core machine depends on how the
    # host numbers its CPUs, so it is off unless asked for.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent() -> None:
    # If pytest itself is killed, the server gets SIGTERM and stops its engine processes with it. vLLM ignores a
    # SIGTERM that arrives while it is still starting, so this only covers a server that is up.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; zombies can wait long for a reaper here."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after its closing parenthesis do not.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _stop_group(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> list[int]:
    """SIGTERM the whole group, SIGKILL what is left after ``grace`` seconds; return what survived both."""
    pgid = process.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()
            if not _group_members(pgid):
                return []
            time.sleep(0.1)
    process.poll()
    return _group_members(pgid)


def _wait_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"vLLM exited with status {process.returncode} while starting; its log ends with:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"vLLM not healthy after {timeout:.0f} s; its log ends with:\n{_tail(log_path)}")


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    workdir = tmp_path_factory.mktemp("vllm")
    python = _ensure_environment(workdir / "build.log")
    venv = python.parent.parent
    host = "127.0.0.1"
    port = _free_port(host)
    log_path = workdir / "server.log"
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(_model_dir()),
        "--served-model-name",
        SERVED_MODEL,
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "1024",
        "--host",
        host,
        "--port",
        str(port),
        # Compiling the model graph triples a cold start (about 50 s instead of 20 s) and buys nothing for tests.
        "--enforce-eager",
        *shlex.split(os.environ.get("INFERENCE_GATEWAY_VLLM_ARGS", "")),
    ]
    timeout = float(os.environ.get("INFERENCE_GATEWAY_VLLM_START_TIMEOUT", "300"))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_server_env(venv),
            cwd=workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    try:
        started = time.monotonic()
        _wait_healthy(process, f"http://{host}:{port}", log_path, timeout)
        print(f"vLLM healthy on port {port} after {time.monotonic() - started:.1f} s (log: {log_path})")
    except RuntimeError as error:
        message = f"{error}\ncommand: {shlex.join(command)}"
        # A server still starting ignores SIGTERM, so waiting long for it only delays the report.
        survivors = _stop_group(process, grace=5.0)
        if survivors:
            message += f"\nprocesses of the group still alive after SIGKILL: {survivors}"
        pytest.fail(message, pytrace=False)
    except BaseException:
        _stop_group(process, grace=5.0)
        raise

    yield VllmServer(
        base_url=f"http://{host}:{port}/v1",
        model=SERVED_MODEL,
        port=port,
        host=host,
        pid=process.pid,
        log_path=log_path,
    )

    survivors = _stop_group(process)
    if survivors:
        pytest.fail(f"vLLM process group {process.pid} left processes after SIGKILL: {survivors}", pytrace=False)


@pytest.fixture(scope="module")
def front(vllm_server: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A gateway of the module's own in front of the session's vLLM (``direct``)."""
    config = direct_config(endpoint(vllm_server.base_url, [vllm_server.model]))
    with gateway(config, tmp_path_factory.mktemp("vllm-gateway")) as server:
        yield server


@pytest.fixture(scope="module")
def client(front: ModelServer) -> Iterator[openai.OpenAI]:
    """The ``openai`` client on ``front``; a long timeout, since vLLM on the CPU may be slow to answer."""
    with openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0, timeout=120) as client:
        yield client
