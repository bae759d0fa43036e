#!/usr/bin/env python3
"""What accounting and observability cost, measured side by side in one run: the same gateway with the usage log,
access log, metrics and rate limits on, and with all of them off, in front of one simulator.

    python scripts/bench-observability.py [--connections 64] [--rounds 7] [--duration 4] [--min-ratio 0.9]

Both gateways run at once; wrk (Debian package `wrk`) loads them in turns, round after round, so that a change in
the machine's load falls on both alike. Prints each round's requests/s and the gateway's CPU time per request, the
medians, and the ratio on/off for whole and streamed answers. Exits 1 when the whole-answer ratio is below
--min-ratio. The "on" gateway's limits are set high enough never to refuse: what is measured is their bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compute_functions.model_server import ModelServer  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token"
USER = "dev-user"

LUA = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""

OFF = {
    "database": {"usage_log": False},
    "logging": {"access_log": False},
    "metrics": {"enabled": False},
}
ON = {
    "database": {"usage_log": True},
    "logging": {"json": True, "access_log": True},
    "metrics": {"enabled": True},
    # What a facility sets: each user's requests and tokens, and how much of a model everyone together may hold.
    "limits": {
        "defaults": {"requests_per_second": 1e6, "tokens_per_minute": 10**12},
        "models": {MODEL: {"total": {"concurrent_requests": 100_000}}},
    },
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def wrk(url: str, script: Path, connections: int, seconds: int) -> tuple[float, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, requests


def start_gateway(name: str, settings: dict[str, object], backend: str, work: Path) -> ModelServer:
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({"endpoints": [{"cluster": "local", "framework": "vllm", "models": [MODEL],
                                                 "base_url": backend}], **settings}))
    server = ModelServer([sys.executable, "-m", "gateway.cli", "serve", "--port", "{port}", "--config", str(config),
                          "--log-level", "warning"], health_path="/resource_server/health",
                         env={"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN, "INFERENCE_GATEWAY_STATE_DIR": str(work / name)},
                         log_path=work / f"{name}.log")
    server.start(timeout=60)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    # Each gateway idles while the other is measured: past the simulator's 5 s keep-alive, the idle one's pooled
    # connections go stale, and the first requests of its next round fail on them.
    parser.add_argument("--duration", type=int, default=4, help="seconds per gateway per round (keep under 5)")
    parser.add_argument("--chunks", type=int, default=16, help="output tokens (stream chunks) per answer")
    parser.add_argument("--min-ratio", type=float, default=0.9)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="bench-observability-"))
    simulator = ModelServer(["{python}", "-m", "gateway.simulator", "--host", "{host}", "--port", "{port}",
                             "--model", MODEL], log_path=work / "simulator.log")
    simulator.start(timeout=30)
    gateways = {"off": start_gateway("off", OFF, simulator.base_url, work),
                "on": start_gateway("on", ON, simulator.base_url, work)}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Explain quantum computing"}],
            "max_tokens": args.chunks}
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        for mode, extra in (("whole", {}), ("streamed", {"stream": True})):
            script = work / f"{mode}.lua"
            script.write_text(LUA.format(body=json.dumps({**body, **extra}), token=TOKEN))
            results[mode] = {name: [] for name in gateways}
            for server in gateways.values():
                wrk(f"http://127.0.0.1:{server.port}/resource_server/v1/chat/completions", script,
                    args.connections, 2)
            for _ in range(args.rounds):
                for name, server in gateways.items():
                    assert server.process is not None
                    before = cpu_seconds(server.process.pid)
                    rps, requests = wrk(f"http://127.0.0.1:{server.port}/resource_server/v1/chat/completions",
                                        script, args.connections, args.duration)
                    cpu = (cpu_seconds(server.process.pid) - before) / requests * 1e6
                    results[mode][name].append((rps, cpu))
        time.sleep(1.5)
        on = gateways["on"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{on.port}/metrics", timeout=10).read().decode()
    finally:
        for server in gateways.values():
            server.stop()
        simulator.stop()

    def value(name: str) -> float:
        match = re.search(rf"^{name} ([\d.e+]+)$", metrics, re.M)
        return float(match.group(1)) if match else float("nan")

    print(f"{args.connections} connections, {args.rounds} rounds of {args.duration} s per gateway, "
          f"{args.chunks} tokens per answer\n")
    ratios = {}
    for mode, runs in results.items():
        print(f"{mode}:")
        for name, rounds in runs.items():
            listed = "  ".join(f"{rps:7.0f}" for rps, _ in rounds)
            print(f"  {name:<4} req/s {listed}   median {statistics.median(r for r, _ in rounds):7.0f}   "
                  f"gateway CPU/request median {statistics.median(c for _, c in rounds):6.1f} us")
        ratios[mode] = statistics.median(r for r, _ in runs["on"]) / statistics.median(r for r, _ in runs["off"])
        print(f"  on/off ratio of medians: {ratios[mode]:.3f}\n")
    print(f"usage rows written {value('gateway_usage_rows_written_total'):.0f}, "
          f"dropped {value('gateway_usage_rows_dropped_total'):.0f}, "
          f"access log lines {sum(1 for line in (work / 'on.log').open() if line.startswith('{'))}")
    verdict = "within" if ratios["whole"] >= args.min_ratio else "OUTSIDE"
    print(f"whole-answer throughput with everything on: {ratios['whole']:.3f} of off ({verdict} the "
          f"{args.min_ratio:.2f} budget)")
    return 0 if ratios["whole"] >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
