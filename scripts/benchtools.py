"""What the benchmark scripts measure with: a gateway started for a run, load from ``wrk`` and its figures, and the
CPU time a process used.

The scripts put the repository's root on ``sys.path`` before they import this module.

``wrk`` (Debian: ``apt-get install wrk``) is a load generator in C that does not bottleneck at the rates measured
here, where a Python client tops out far below the gateway. The CPU time comes from ``/proc``: a per-request cost
that other load on a shared machine disturbs far less than requests per second.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compute_functions.model_server import ModelServer
from gateway.cli import serve_command

# wrk's script: every request is the same; ``done`` prints the figures as one JSON line after wrk's own report.
_SCRIPT = """
wrk.method = "%(method)s"
%(body)s
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "seconds": %%f, "p50": %%f, "p99": %%f, "mean": %%f, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def start_gateway(
    settings: dict[str, Any], work: Path, *, env: dict[str, str] | None = None, name: str = "gateway"
) -> ModelServer:
    """A gateway process serving ``settings`` once it answers its health check; its configuration
    (``work/NAME.yaml``), log (``work/NAME.log``) and state lie in ``work``."""
    config = work / f"{name}.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    gateway = ModelServer(
        serve_command(config),
        health_path="/resource_server/health",
        env={"INFERENCE_GATEWAY_STATE_DIR": str(work), **(env or {})},
        log_path=work / f"{name}.log",
    )
    gateway.start(timeout=60)
    return gateway


def need_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")


def wrk_script(body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> str:
    """wrk's Lua script for the same request each time: a POST of ``body`` as JSON, or a GET without one."""
    lines = [f'wrk.headers["{name}"] = "{value}"' for name, value in (headers or {}).items()]
    if body is not None:
        lines.insert(0, 'wrk.headers["content-type"] = "application/json"')
    script_body = "" if body is None else f"wrk.body = [==[{json.dumps(body)}]==]"
    return _SCRIPT % {"method": "GET" if body is None else "POST", "body": script_body, "headers": "\n".join(lines)}


def wrk(
    url: str,
    body: dict[str, Any] | None = None,
    *,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
    fail_with: Callable[[str], Exception] | None = None,
) -> dict[str, Any]:
    """One ``wrk`` run of the same request: a POST of ``body`` as JSON, or a GET without one.

    The figures: ``requests`` answered in ``seconds``, ``rps`` (their count over the time), ``steady_rps`` (the
    closed loop's rate, ``connections`` over the mean latency), latency ``p50``, ``p99`` and ``mean`` in ms,
    ``failed`` (socket errors, timeouts and answers of status 400 and above, each kind also under its own name),
    ``cpu``, the CPU seconds ``wrk`` itself used, and ``busy``, the share of the machine's cores busy meanwhile
    (near 1, every process queues for a core, and latency says more about the machine than the path). A run with
    failures returns its figures as well, unless ``fail_with`` is given: then it raises ``fail_with`` with a message
    holding wrk's own report (``SystemExit`` ends a benchmark; one that runs a failed round again passes an exception
    of its own).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_script(body, headers))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = machine_ticks()
    try:
        run = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(script.name)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, total = (now - then for now, then in zip(machine_ticks(), machine, strict=True))
    report, line = run.stdout.rsplit("RESULT ", 1)
    result: dict[str, Any] = json.loads(line)
    result["rps"] = result["requests"] / result["seconds"]
    # A closed loop's rate in its steady state: each connection has one request in flight at all times.
    result["steady_rps"] = connections / (result["mean"] / 1000) if result["mean"] else 0.0
    result["failed"] = sum(result[kind] for kind in ("connect", "read", "write", "status", "timeout"))
    result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["busy"] = busy / total if total else 0.0
    if result["failed"] and fail_with is not None:
        raise fail_with(f"wrk saw errors against {url}:\n{report}")
    return result


def machine_ticks() -> tuple[int, int]:
    """The ticks all cores spent busy, and in all, since boot (``/proc/stat``; waiting for I/O is idle)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    # Guest time is counted in user time already.
    total = sum(ticks[:8])
    return total - idle, total


def _cpu_ticks(stat: str) -> tuple[int, int]:
    """The process group and the user and system CPU ticks from the text of ``/proc/PID/stat``."""
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    return int(fields[2]), int(fields[11]) + int(fields[12])


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process."""
    return _cpu_ticks(Path(f"/proc/{pid}/stat").read_text())[1] / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(group: int) -> float:
    """User and system CPU time of every live process in process group ``group``: a server started in a session of
    its own (as ``ModelServer`` starts it) with the processes it started, such as the gateway's usage writer."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            owner, used = _cpu_ticks((entry / "stat").read_text())
        except OSError:
            continue
        if owner == group:
            ticks += used
    return ticks / os.sysconf("SC_CLK_TCK")
