#!/usr/bin/env python3
"""Replicas side by side in one run: one gateway, two behind HAProxy, and ``serve --workers 2``, each measured with wrk.

    python scripts/bench-replicas.py [--connections 64] [--duration 8]

Against a simulator with no delays (the most a gateway can carry), whole answers of one token:

- one replica, directly and through HAProxy (the load balancer's own cost);
- two replicas behind HAProxy (``examples/replicas/haproxy.cfg``, the deployment example's configuration);
- one ``serve --workers 2`` behind HAProxy, and directly.

Also the CPU each request costs a replica (its process group's CPU time over the requests it answered), from which
docs/deployment.md sizes a deployment. Needs Debian's ``wrk`` and ``haproxy``. On a small machine the load
generator, HAProxy, the simulator and the replicas share the cores: say how many there were with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchtools import group_cpu_seconds, wrk  # noqa: E402

from compute_functions.model_server import ModelServer, free_port  # noqa: E402
from gateway.cli import serve_command  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token"
HAPROXY_CONFIG = REPO / "examples" / "replicas" / "haproxy.cfg"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 1}


class HAProxy:
    """The example's HAProxy in front of ``servers`` (two server lines; the same address twice for one replica)."""

    def __init__(self, servers: tuple[str, str], work: Path) -> None:
        self.port = free_port()
        self.pid_file = work / f"haproxy-{self.port}.pid"
        self.env = {
            **os.environ,
            "RUN_DIR": str(work),
            "LB_BIND": f"127.0.0.1:{self.port}",
            "STATS_BIND": f"127.0.0.1:{free_port()}",
            "REPLICA1": servers[0],
            "REPLICA2": servers[1],
        }

    def __enter__(self) -> HAProxy:
        subprocess.run(
            ["haproxy", "-D", "-p", str(self.pid_file), "-f", str(HAPROXY_CONFIG)],
            env=self.env,
            check=True,
            capture_output=True,
        )
        time.sleep(3)  # two health checks a second apart mark the servers up
        return self

    def __exit__(self, *_: object) -> None:
        os.kill(int(self.pid_file.read_text()), 15)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/resource_server/v1/chat/completions"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=8)
    args = parser.parse_args()
    for command in ("wrk", "haproxy"):
        if shutil.which(command) is None:
            raise SystemExit(f"{command} is needed: apt-get install -y {command}")

    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    config = work / "gateway.yaml"
    config.write_text(json.dumps({"endpoints": [{"cluster": "local", "framework": "vllm", "models": [MODEL],
                                                  "base_url": simulator.base_url}]}))  # fmt: skip
    env = {"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN, "INFERENCE_GATEWAY_STATE_DIR": str(work / "state")}
    servers = []
    try:
        for name, extra in (("r1", []), ("r2", []), ("w2", ["--workers", "2"])):
            server = ModelServer(
                [*serve_command(config), *extra],
                health_path="/resource_server/health",
                env=env,
                log_path=work / f"{name}.log",
            )
            server.start(timeout=60)
            servers.append(server)
        r1, r2, w2 = servers

        def address(server: ModelServer) -> str:
            return f"{server.host}:{server.port}"

        def direct(server: ModelServer) -> str:
            return f"http://{address(server)}/resource_server/v1/chat/completions"

        def load(url: str) -> dict[str, Any]:
            headers = {"authorization": f"Bearer {TOKEN}"}
            return wrk(
                url, BODY, connections=args.connections, seconds=args.duration, headers=headers, fail_with=SystemExit
            )

        rows = []
        assert r1.process is not None
        before = group_cpu_seconds(r1.process.pid)
        result = load(direct(r1))
        cpu_ms = (group_cpu_seconds(r1.process.pid) - before) * 1000 / result["requests"]
        rows.append(("one replica, direct", result))
        with HAProxy((address(r1), address(r1)), work) as lb:
            rows.append(("one replica, through HAProxy", load(lb.url)))
        with HAProxy((address(r1), address(r2)), work) as lb:
            rows.append(("two replicas, through HAProxy", load(lb.url)))
        rows.append(("serve --workers 2, direct", load(direct(w2))))
        with HAProxy((address(w2), address(w2)), work) as lb:
            rows.append(("serve --workers 2, through HAProxy", load(lb.url)))
    finally:
        for server in servers:
            server.stop()
        simulator.stop()

    print(f"{os.cpu_count()} cores, wrk -t1 -c{args.connections} -d{args.duration}s, whole answers of one token")
    print(f"{'':38} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, result in rows:
        print(f"{name:38} {result['rps']:8.0f} {result['p50']:8.2f} {result['p99']:8.2f}")
    print(f"CPU per request in one replica (with its usage writer): {cpu_ms:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
