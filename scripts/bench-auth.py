#!/usr/bin/env python3
"""The cost of authentication per request: a cached Globus token against the static dev token.

    python scripts/bench-auth.py [--iterations 200000] [--http] [--connections 32] [--duration 5]

In process: the auth work a request does, reading the ``Authorization`` header and asking the provider chain, timed
call by call over many iterations (mean, p50, p99 in microseconds). The Globus token is introspected once, through the
real globus-sdk against the tests' local Globus stand-in, and every timed call is then a cache hit.

With ``--http``: the same comparison end to end, as the front door's benchmark does it: two gateway processes in
front of one simulator, one taking dev tokens and one Globus tokens, each loaded with wrk (Debian package ``wrk``)
on ``GET /resource_server/v1/models``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchtools import cpu_seconds, need_wrk, start_gateway, wrk  # noqa: E402

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.auth.base import Authenticator  # noqa: E402
from gateway.auth.bearer import ProviderChain, bearer_token  # noqa: E402
from gateway.auth.dev import DevAuthenticator  # noqa: E402
from gateway.auth.globus import GlobusAuthenticator  # noqa: E402
from gateway.config import GlobusAuthSettings  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402
from tests.globus_fake import FakeGlobus  # noqa: E402

DEV_TOKEN = "dev-bench-token-0123456789abcdef0123456789"


async def timed(call: Callable[[], Awaitable[object]], iterations: int) -> list[float]:
    """Microseconds per call, one sample per call."""
    for _ in range(1000):
        await call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        started = clock()
        await call()
        samples.append((clock() - started) / 1000)
    return samples


def summary(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return statistics.fmean(ordered), ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]


async def in_process(fake: FakeGlobus, iterations: int) -> None:
    globus = GlobusAuthenticator.from_settings(GlobusAuthSettings(required_groups=["g-bench"]))
    globus_token = fake.issue("jdoe@anl.gov", groups=["g-bench"])
    await globus.authenticate(globus_token)
    assert fake.calls["introspect"] == 1
    dev = DevAuthenticator(DEV_TOKEN)
    chains: dict[str, Authenticator] = {
        "dev": ProviderChain([dev]),
        "globus": ProviderChain([globus]),
        "dev, globus": ProviderChain([dev, globus]),
    }
    cases = [
        ("dev token", "dev", DEV_TOKEN),
        ("Globus token, cached", "globus", globus_token),
        ("dev token", "dev, globus", DEV_TOKEN),
        ("Globus token, cached", "dev, globus", globus_token),
    ]

    async def nothing() -> None:
        return None

    overhead = summary(await timed(nothing, iterations))[1]
    print(f"{iterations} calls per case; timer and loop overhead {overhead:.2f} µs (p50), included below\n")
    print(f"{'token':<24}{'providers':<14}{'mean µs':>9}{'p50 µs':>9}{'p99 µs':>9}")
    results = {}
    for label, providers, token in cases:
        chain = chains[providers]
        header = f"Bearer {token}"

        async def request_auth(chain: Authenticator = chain, header: str = header) -> object:
            return await chain.authenticate(bearer_token(header))

        mean, p50, p99 = summary(await timed(request_auth, iterations))
        results[(label, providers)] = p50
        print(f"{label:<24}{providers:<14}{mean:>9.2f}{p50:>9.2f}{p99:>9.2f}")
    assert fake.calls["introspect"] == 1, "every timed Globus call must be a cache hit"
    added = results[("Globus token, cached", "globus")] - results[("dev token", "dev")]
    print(f"\nA cached Globus token costs {added:+.2f} µs (p50) against the dev token.")
    await globus.close()


def http(fake: FakeGlobus, connections: int, duration: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    simulator = ModelServer(simulator_command("facebook/opt-125m"), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    globus_token = fake.issue("jdoe@anl.gov")
    try:
        print(f"\nHTTP, wrk -c{connections} -d{duration}s on GET /resource_server/v1/models:")
        print(f"{'providers':<12}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'gateway CPU µs/req':>20}")
        for provider, token in (("dev", DEV_TOKEN), ("globus", globus_token)):
            endpoint = {"cluster": "local", "framework": "vllm", "models": ["facebook/opt-125m"]}
            gateway = start_gateway(
                {"auth": {"providers": [provider]}, "endpoints": [{**endpoint, "base_url": simulator.base_url}]},
                work,
                env={**fake.gateway_env(), "INFERENCE_GATEWAY_DEV_TOKEN": DEV_TOKEN},
                name=provider,
            )
            assert gateway.process is not None
            try:
                cpu_before = cpu_seconds(gateway.process.pid)
                result = wrk(
                    f"http://127.0.0.1:{gateway.port}/resource_server/v1/models",
                    connections=connections,
                    seconds=duration,
                    headers={"authorization": f"Bearer {token}"},
                    fail_with=SystemExit,
                )
                cpu = (cpu_seconds(gateway.process.pid) - cpu_before) / result["requests"] * 1e6
            finally:
                gateway.stop()
            print(f"{provider:<12}{result['rps']:>10.0f}{result['p50']:>9.2f}{result['p99']:>9.2f}{cpu:>20.1f}")
        print(f"(introspections during the Globus run: {fake.calls['introspect']})")
    finally:
        simulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--http", action="store_true", help="also compare two gateway processes with wrk")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    if args.http:
        need_wrk()
    with FakeGlobus() as fake:
        os.environ.update(fake.gateway_env())
        asyncio.run(in_process(fake, args.iterations))
        if args.http:
            fake.calls.clear()
            http(fake, args.connections, args.duration)


if __name__ == "__main__":
    main()
