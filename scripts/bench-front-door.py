#!/usr/bin/env python3
"""The front door's cost, measured side by side in one run: the simulator directly vs through the gateway.

    python scripts/bench-front-door.py [--connections 64] [--duration 10] [--chunks 16]

Throughput and latency come from wrk (Debian package `wrk`), which does not bottleneck at these rates, against a
simulator with no delays: this measures the most the gateway can carry. Time to first token comes from the project's
own benchmark-serving tool at the same concurrency against a second simulator that answers like a small model on a
GPU (50 ms to the first token, 10 ms per token): at saturation every latency is queueing, so the gateway's added
time to first token is measured where the load leaves it headroom, as in service: 64 clients in step, 64 clients
arriving as a Poisson process, and one client alone. Prints requests/s, p50/p99
latency, p50 time to first token, each ratio gateway/direct, and the gateway's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchtools import need_wrk, start_gateway, wrk  # noqa: E402

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402

MODEL = "facebook/opt-125m"
TIMED_MODEL = "timed-model"
TOKEN = "bench-token"


def load(url: str, body: dict[str, object], connections: int, duration: int) -> dict[str, Any]:
    """wrk's figures for one run; a run with failed requests ends the benchmark."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    return wrk(url, body, connections=connections, seconds=duration, headers=headers, fail_with=SystemExit)


def ttft(url: str, connections: int, prompts: int, chunks: int, workdir: Path, rate: str = "inf") -> float:
    output = workdir / f"ttft-{os.urandom(3).hex()}.jsonl"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark-serving.py"),
            "--backend",
            "openai-chat",
            "--model",
            TIMED_MODEL,
            "--base-url",
            url,
            "--dataset-name",
            "random",
            "--random-input-len",
            "8",
            "--random-output-len",
            str(chunks),
            "--ignore-eos",
            "--num-prompts",
            str(prompts),
            "--max-concurrency",
            str(connections),
            "--request-rate",
            rate,
            "--output-file",
            str(output),
            "--api-key",
            TOKEN,
            "--disable-tqdm",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    summary = [json.loads(line) for line in output.read_text().splitlines() if '"summary"' in line][-1]
    return float(summary["median_ttft_ms"])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--chunks", type=int, default=16, help="output tokens (stream chunks) per answer")
    parser.add_argument("--ttft-prompts", type=int, default=1000)
    args = parser.parse_args()
    need_wrk()

    work = Path(tempfile.mkdtemp(prefix="bench-front-door-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    timed = ModelServer(
        simulator_command(TIMED_MODEL, options=("--ttft", "0.05", "--tpot", "0.01")), log_path=work / "timed.log"
    )
    timed.start(timeout=30)
    endpoints = [
        {"cluster": "local", "framework": "vllm", "models": [MODEL], "base_url": simulator.base_url},
        {"cluster": "timed", "framework": "vllm", "models": [TIMED_MODEL], "base_url": timed.base_url},
    ]
    gateway = start_gateway({"endpoints": endpoints}, work, env={"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN})
    assert gateway.process is not None
    urls = {
        "direct": f"{simulator.base_url}/chat/completions",
        "gateway": f"http://127.0.0.1:{gateway.port}/resource_server/v1/chat/completions",
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Explain quantum computing"}],
        "max_tokens": args.chunks,
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode, extra in (("whole", {}), ("streamed", {"stream": True})):
            for target, url in urls.items():
                load(url, {**body, **extra}, args.connections, 2)  # warm-up
                results[f"{mode}/{target}"] = load(url, {**body, **extra}, args.connections, args.duration)
        timed_urls = {"direct": f"{timed.base_url}/chat/completions", "gateway": urls["gateway"]}
        for target, url in timed_urls.items():
            results[f"streamed/{target}"]["ttft_p50_ms"] = ttft(
                url, args.connections, args.ttft_prompts, args.chunks, work
            )
            # The same 64 clients, but arriving as a Poisson process at about 80% of what closed-loop clients
            # send (64 clients / 0.2 s per answer = 320 req/s): closed-loop clients that all start together stay
            # in step, so each wave of 64 requests queues behind itself in any single-threaded server.
            results[f"streamed/{target}"]["ttft_poisson_p50_ms"] = ttft(
                url, args.connections, args.ttft_prompts, args.chunks, work, rate="250"
            )
            results[f"streamed/{target}"]["ttft_one_p50_ms"] = ttft(url, 1, 100, args.chunks, work)
        rss = peak_rss_mb(gateway.process.pid)
    finally:
        gateway.stop()
        simulator.stop()
        timed.stop()

    print(
        f"{args.connections} connections, {args.duration} s per run, {args.chunks} tokens per answer "
        f"(streamed: {args.chunks} content chunks)\n"
    )
    print(f"{'run':<32}{'direct':>12}{'gateway':>12}{'ratio':>9}")
    for mode in ("whole", "streamed"):
        for key, label in (
            ("rps", "req/s"),
            ("p50", "p50 ms"),
            ("p99", "p99 ms"),
            ("ttft_p50_ms", "TTFT p50 ms"),
            ("ttft_poisson_p50_ms", "TTFT p50 ms, Poisson"),
            ("ttft_one_p50_ms", "TTFT p50 ms, one client"),
        ):
            direct, through = results[f"{mode}/direct"].get(key), results[f"{mode}/gateway"].get(key)
            if direct is None or through is None:
                continue
            print(f"{mode + ' ' + label:<32}{direct:>12.2f}{through:>12.2f}{through / direct:>9.2f}")
    ttft_added = results["streamed/gateway"]["ttft_p50_ms"] - results["streamed/direct"]["ttft_p50_ms"]
    poisson_added = (
        results["streamed/gateway"]["ttft_poisson_p50_ms"] - results["streamed/direct"]["ttft_poisson_p50_ms"]
    )
    print("\nadded to p50 time to first token (simulator at 50 ms TTFT, 10 ms/token, 64 clients):")
    print(f"  clients in step (closed loop):        {ttft_added:.2f} ms")
    print(f"  Poisson arrivals at 250 req/s:        {poisson_added:.2f} ms")
    one_added = results["streamed/gateway"]["ttft_one_p50_ms"] - results["streamed/direct"]["ttft_one_p50_ms"]
    print(f"  one client at a time:                 {one_added:.2f} ms")
    print(f"gateway peak RSS: {rss:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
