#!/usr/bin/env python3
"""Federation measured in one run: routing cost, balance, a slow endpoint, and an endpoint killed mid-run.

    python scripts/bench-federation.py [--requests 2000] [--concurrency 32]

1. Routing decision cost: selection among 100 registered endpoints, in-process, µs per request.
2. Two equal hot endpoints: how many requests each served (target: within 10%).
3. One endpoint at twice the time per token: requests each served and p50/p99 latency, least-loaded selection
   (the default) vs round-robin, same load, same simulators.
4. One of two endpoints killed during a streamed run: failures of requests that had not yet received a byte
   (target: none) and of requests cut mid-stream (they get an in-band error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.cli import serve_command  # noqa: E402
from gateway.federation.availability import Availability  # noqa: E402
from gateway.federation.registry import Endpoint  # noqa: E402
from gateway.federation.selection import plan  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402
from tests.support import metric, scrape  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token"
FAST_STATUS = {"status_interval": 0.5, "status_jitter": 0.1, "stale_after": 5, "status_timeout": 2}


@dataclass
class Result:
    ok: bool
    started: bool
    latency: float
    error: str = ""


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> Result:
    begin = time.perf_counter()
    started = False
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return Result(False, False, time.perf_counter() - begin, f"HTTP {response.status}")
            if not body.get("stream"):
                await response.read()
                return Result(True, True, time.perf_counter() - begin)
            async for line in response.content:
                if line.startswith(b'data: {"error"'):
                    return Result(False, started, time.perf_counter() - begin, "in-band error")
                if line.startswith(b"data: [DONE]"):
                    return Result(True, True, time.perf_counter() - begin)
                if line.startswith(b"data: "):
                    started = True
            return Result(False, started, time.perf_counter() - begin, "stream ended without [DONE]")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Result(False, started, time.perf_counter() - begin, exc.__class__.__name__)


async def load(url: str, requests: int, concurrency: int, stream: bool, tokens: int = 32) -> list[Result]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Balance me"}],
        "max_tokens": tokens,
        "stream": stream,
    }
    queue = list(range(requests))
    results: list[Result] = []
    headers = {"authorization": f"Bearer {TOKEN}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            queue.pop()
            results.append(await _one(session, url, body))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


def simulator(work: Path, name: str, tpot: float, port: int = 0) -> ModelServer:
    # Each token slows by 3% per other running sequence, as a batched engine does; without that, an
    # endpoint's speed would not depend on how many requests it is sent, unlike a real vLLM.
    options = ("--ttft", "0.01", "--tpot", str(tpot), "--tpot-batch-factor", "0.03")
    server = ModelServer(simulator_command(MODEL, options=options), port=port, log_path=work / f"{name}.log")
    server.start(timeout=30)
    return server


def gateway(work: Path, name: str, backends: dict[str, ModelServer], policy: str = "least_loaded") -> ModelServer:
    endpoints = [{"cluster": cluster, "framework": "vllm", "models": [MODEL], "base_url": sim.base_url}
                 for cluster, sim in backends.items()]  # fmt: skip
    config = work / f"{name}.yaml"
    config.write_text(json.dumps({"endpoints": endpoints, "federation": {**FAST_STATUS, "policy": policy},
                                  "logging": {"access_log": False}}))  # fmt: skip
    server = ModelServer(serve_command(config), health_path="/resource_server/health",
                         env={"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN, "INFERENCE_GATEWAY_STATE_DIR": str(work / name)},
                         log_path=work / f"{name}.log")  # fmt: skip
    server.start(timeout=60)
    time.sleep(1.0)  # one status round, so that both endpoints are seen hot
    return server


def served(sim: ModelServer) -> float:
    return metric(scrape(f"http://127.0.0.1:{sim.port}/metrics"), "vllm:request_success_total")


def url_of(server: ModelServer) -> str:
    return f"http://127.0.0.1:{server.port}/resource_server/v1/chat/completions"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def routing_cost() -> None:
    endpoints = []
    for index in range(100):
        endpoint = Endpoint(cluster=f"c{index}", framework="vllm", models=(MODEL,), transport="direct",
                            kind="vllm", base_url=f"http://c{index}/v1")  # fmt: skip
        endpoint.observe(Availability("hot", running=index % 5, waiting=0))
        endpoint.in_flight = index % 7
        endpoints.append(endpoint)
    rng = random.Random(0)
    rounds = 50_000
    begin = time.perf_counter()
    for _ in range(rounds):
        plan(endpoints, MODEL, rng, limit=3)
    cost = (time.perf_counter() - begin) / rounds * 1e6
    print(f"1. routing decision among 100 hot endpoints: {cost:.1f} µs per request (target < 50 µs)")


def balance(work: Path, args: argparse.Namespace) -> None:
    a, b = simulator(work, "equal-a", 0.002), simulator(work, "equal-b", 0.002)
    front = gateway(work, "gateway-equal", {"a": a, "b": b})
    try:
        before = served(a), served(b)
        results = asyncio.run(load(url_of(front), args.requests, args.concurrency, stream=False))
        counts = served(a) - before[0], served(b) - before[1]
    finally:
        front.stop(), a.stop(), b.stop()
    failed = sum(not r.ok for r in results)
    print(
        f"2. two equal endpoints: a served {counts[0]:.0f}, b served {counts[1]:.0f} "
        f"(difference {abs(counts[0] - counts[1]) / max(counts):.1%}, target < 10%); failed {failed}"
    )


def slow_endpoint(work: Path, args: argparse.Namespace) -> None:
    fast, slow = simulator(work, "fast", 0.002), simulator(work, "slow", 0.004)
    rows = []
    try:
        for policy in ("least_loaded", "round_robin"):
            front = gateway(work, f"gateway-{policy}", {"fast": fast, "slow": slow}, policy)
            try:
                before = served(fast), served(slow)
                results = asyncio.run(load(url_of(front), args.requests, args.concurrency, stream=False))
                counts = served(fast) - before[0], served(slow) - before[1]
            finally:
                front.stop()
            latencies = [r.latency for r in results if r.ok]
            rows.append((policy, counts, percentile(latencies, 50), percentile(latencies, 99),
                         sum(not r.ok for r in results)))  # fmt: skip
    finally:
        fast.stop(), slow.stop()
    print("3. one endpoint at twice the time per token:")
    print(f"   {'policy':<14}{'fast':>8}{'slow':>8}{'p50 ms':>10}{'p99 ms':>10}{'failed':>8}")
    for policy, counts, p50, p99, failed in rows:
        print(f"   {policy:<14}{counts[0]:>8.0f}{counts[1]:>8.0f}{p50:>10.1f}{p99:>10.1f}{failed:>8}")
    print(f"   p99 least-loaded / round-robin: {rows[0][3] / rows[1][3]:.2f}")


def killed_endpoint(work: Path, args: argparse.Namespace) -> None:
    steady, doomed = simulator(work, "steady", 0.002), simulator(work, "doomed", 0.002)
    front = gateway(work, "gateway-kill", {"steady": steady, "doomed": doomed})

    async def run() -> list[Result]:
        running = asyncio.create_task(load(url_of(front), args.requests, args.concurrency, stream=True))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(doomed.stop, 0)
        return await running

    try:
        results = asyncio.run(run())
    finally:
        front.stop(), steady.stop(), doomed.stop()
    not_started = [r for r in results if not r.ok and not r.started]
    cut = [r for r in results if not r.ok and r.started]
    print(
        f"4. one of two endpoints killed 1 s into a streamed run of {len(results)} requests: "
        f"{len(not_started)} failed before their first byte (target 0), {len(cut)} cut mid-stream "
        f"(in-band error), {sum(r.ok for r in results)} completed"
    )
    if not_started:
        print("   first failures:", sorted({r.error for r in not_started}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    routing_cost()
    balance(work, args)
    slow_endpoint(work, args)
    killed_endpoint(work, args)
    print(f"\n(statistics over {args.requests} requests at concurrency {args.concurrency}; logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
