#!/usr/bin/env python3
"""The gateway's CPU time per request, which a shared, busy machine disturbs far less than requests per second.

    python scripts/bench-cpu-per-request.py [--connections 32] [--duration 5] [--chunks 16]

Starts a simulator with no delays and the gateway in front of it, loads it with wrk (whole answers, then streamed
ones, after a warm-up) and divides the serving process's user and system CPU time (from /proc) by the requests wrk
completed. Run it from two checkouts one after the other, several times, to compare two versions of the gateway.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchtools import cpu_seconds, need_wrk, start_gateway, wrk  # noqa: E402

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token"


def load(url: str, body: dict[str, object], connections: int, seconds: int) -> int:
    """The requests answered in one wrk run; a run with failed requests ends the benchmark."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    result = wrk(url, body, connections=connections, seconds=seconds, headers=headers, fail_with=SystemExit)
    return int(result["requests"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=16, help="output tokens (stream chunks) per answer")
    args = parser.parse_args()
    need_wrk()
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    endpoint = {"cluster": "local", "framework": "vllm", "models": [MODEL], "base_url": simulator.base_url}
    gateway = start_gateway({"endpoints": [endpoint]}, work, env={"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN})
    assert gateway.process is not None
    url = f"http://127.0.0.1:{gateway.port}/resource_server/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Explain quantum computing"}]}
    body["max_tokens"] = args.chunks
    try:
        load(url, body, args.connections, 2)
        for label, extra in (("whole", {}), ("streamed", {"stream": True})):
            before = cpu_seconds(gateway.process.pid)
            requests = load(url, {**body, **extra}, args.connections, args.duration)
            used = cpu_seconds(gateway.process.pid) - before
            print(f"{label}: {requests} requests, {used / requests * 1e6:.1f} us of gateway CPU per request")
    finally:
        gateway.stop()
        simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
