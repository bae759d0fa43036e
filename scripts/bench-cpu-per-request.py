#!/usr/bin/env python3
"""The gateway's CPU time per request, which a shared, busy machine disturbs far less than requests per second.

    python scripts/bench-cpu-per-request.py [--connections 32] [--duration 5] [--chunks 16]

Starts a simulator with no delays and the gateway in front of it, loads it with wrk (whole answers, then streamed
ones, after a warm-up) and divides the serving process's user and system CPU time (from /proc) by the requests wrk
completed. Run it from two checkouts one after the other, several times, to compare two versions of the gateway.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.cli import serve_command  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, body: dict[str, object], connections: int, seconds: int, work: Path) -> int:
    script = work / "post.lua"
    script.write_text(
        f"wrk.method = \"POST\"\nwrk.body = '{json.dumps(body)}'\n"
        f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    match = re.search(r"(\d+) requests in", out)
    assert match, out
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=16, help="output tokens (stream chunks) per answer")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    config = work / "gateway.yaml"
    config.write_text(json.dumps({"endpoints": [{"cluster": "local", "framework": "vllm", "models": [MODEL],
                                                 "base_url": simulator.base_url}]}))  # fmt: skip
    gateway = ModelServer(
        serve_command(config),
        health_path="/resource_server/health",
        env={"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN, "INFERENCE_GATEWAY_STATE_DIR": str(work)},
        log_path=work / "gateway.log",
    )
    gateway.start(timeout=60)
    assert gateway.process is not None
    url = f"http://127.0.0.1:{gateway.port}/resource_server/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Explain quantum computing"}]}
    body["max_tokens"] = args.chunks
    try:
        load(url, body, args.connections, 2, work)
        for label, extra in (("whole", {}), ("streamed", {"stream": True})):
            before = cpu_seconds(gateway.process.pid)
            requests = load(url, {**body, **extra}, args.connections, args.duration, work)
            used = cpu_seconds(gateway.process.pid) - before
            print(f"{label}: {requests} requests, {used / requests * 1e6:.1f} us of gateway CPU per request")
    finally:
        gateway.stop()
        simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
