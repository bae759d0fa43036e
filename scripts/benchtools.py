"""Load from ``wrk`` for the benchmark scripts: one POST, repeated, and its figures as one dictionary.

``wrk`` (Debian: ``apt-get install wrk``) is a load generator in C that does not bottleneck at the rates measured
here, where a Python client tops out far below the gateway.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from typing import Any

# wrk's script: every request is the same POST; ``done`` prints the figures as one JSON line.
_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["content-type"] = "application/json"
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


def need_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")


def wrk(url: str, body: dict[str, Any], *, connections: int, seconds: float, headers: dict[str, str]) -> dict[str, Any]:
    """One ``wrk`` run: requests/s, latency p50/p99 in ms, failures, and the CPU seconds ``wrk`` itself used."""
    lines = "\n".join(f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_SCRIPT % {"body": json.dumps(body), "headers": lines})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    result["rps"] = result["requests"] / result["seconds"]
    result["failed"] = sum(result[kind] for kind in ("connect", "read", "write", "status", "timeout"))
    result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result
