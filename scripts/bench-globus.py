"""Side by side in one run: the ``globus``, ``parsl`` and ``direct`` transports in front of the same simulator.

    .venv/bin/python scripts/bench-globus.py [--requests 400] [--concurrency 32,128] [--streams 20] [--tasks 200]
                                             [--ttft 0] [--tpot 0.002] [--load-seconds 5] [--tokens 16]

It needs what the Globus Compute tests need (docs/testing.md): RabbitMQ, and port 5000. It
starts a simulator, the local Globus Compute service (tests/globus_compute_service.py) with RabbitMQ queues of
its own, a real ``globus-compute-endpoint`` daemon from endpoint_configs/globus-compute/local/ with the
gateway's functions registered and allowed (as the operator guide does it), and one gateway with three endpoints
on the simulator: ``direct/vllm`` (plain HTTP), ``parsl/vllm`` (the gateway's own Parsl worker runs the compute
function) and ``globus/vllm`` (the function is a Globus Compute task on the endpoint's worker). The workers find
the model server already running on its port. Then:

- whole answers of one token, one at a time and at each ``--concurrency``: latency p50/p99, and what each
  transport adds over the simulator alone; requests/s at that concurrency, and the requests that failed;
- streamed answers: time to the first token;
- with ``wrk`` (when installed), at each ``--concurrency``, for ``--load-seconds`` each: answers of ``--tokens``
  tokens, whole and streamed, through each path and to the simulator alone: requests/s, p50, and the ratio to
  ``direct`` (run with ``--ttft 0.02 --tpot 0.005`` for model-like timing);
- the first request after a cold start: the endpoint restarted, so its user endpoint (and workers) must start;
- the floor: the SDK ``Executor`` and the endpoint alone, without the gateway: one registered ``status`` task at
  a time (round trip), and ``--tasks`` submitted at once (tasks/s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

MODEL = "facebook/opt-125m"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def whole(url: str, headers: dict[str, str], count: int, concurrency: int) -> tuple[list[float], float, int]:
    """Latencies of ``count`` one-token answers, ``concurrency`` at a time, the requests per second, the failures."""
    import httpx

    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}
    failed = 0

    def run(share: int) -> list[float]:
        nonlocal failed
        latencies = []
        with httpx.Client(headers=headers, timeout=120) as client:
            for _ in range(share):
                started = time.perf_counter()
                try:
                    response = client.post(f"{url}/chat/completions", json=body)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                failed += not ok
        return latencies

    shares = [count // concurrency + (1 if n < count % concurrency else 0) for n in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(run, shares))
    elapsed = time.perf_counter() - started
    return [value for result in results for value in result], count / elapsed, failed


def first_tokens(url: str, headers: dict[str, str], count: int) -> list[float]:
    import httpx

    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "stream": True}
    firsts = []
    with httpx.Client(headers=headers, timeout=120) as client:
        for _ in range(count):
            started = time.perf_counter()
            first = None
            with client.stream("POST", f"{url}/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if first is None and line.startswith("data: {") and '"content"' in line:
                        first = time.perf_counter() - started
            assert first is not None, "no token came"
            firsts.append(first)
    return firsts


def row(name: str, values: list[float], base: list[float] | None) -> str:
    p50, p99 = percentile(values, 50) * 1e3, percentile(values, 99) * 1e3
    text = f"  {name:10} {p50:9.2f} {p99:9.2f}"
    if base is not None:
        b50, b99 = percentile(base, 50) * 1e3, percentile(base, 99) * 1e3
        text += f" {p50 - b50:10.2f} {p99 - b99:10.2f}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="whole answers per path and concurrency")
    parser.add_argument("--concurrency", default="32,128", help="the concurrencies beyond one, comma-separated")
    parser.add_argument("--streams", type=int, default=20, help="streamed answers per path")
    parser.add_argument("--tasks", type=int, default=200, help="tasks for the SDK-and-endpoint floor")
    parser.add_argument("--tpot", type=float, default=0.002, help="the simulator's time per output token")
    parser.add_argument("--ttft", type=float, default=0.0, help="the simulator's time to the first token")
    parser.add_argument("--load-seconds", type=float, default=5.0, help="each wrk run's length (0: none)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer in the wrk runs")
    args = parser.parse_args(argv)

    import httpx
    from benchtools import start_gateway
    from globus_compute_sdk import Client, Executor

    from compute_functions.model_server import ModelServer
    from gateway.simulator import command as simulator_command
    from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
    from tests.globus_compute_service import ComputeService

    work = Path(tempfile.mkdtemp(prefix="bench-globus-"))
    timing = ("--tpot", str(args.tpot), "--ttft", str(args.ttft))
    simulator = ModelServer(simulator_command(MODEL, options=timing), log_path=work / "sim.log")
    simulator.start(30)
    # The workers find this server on its port and never start one.
    on_node = {"command": ["true"], "port": simulator.port, "state_dir": str(work / "servers")}
    token = os.urandom(16).hex()
    headers = {"authorization": f"Bearer {token}"}
    try:
        with ComputeService(wait=3600) as service:
            env = {**service.env(), **credentials()}
            os.environ.update(env)
            daemon = EndpointDaemon("bench-inference", work / "endpoint", service.env())
            (work / "endpoint").mkdir()
            try:
                site = ComputeSite(daemon, "globus", MODEL, ["true"], work / "servers").set_up()
                site.warm_up()
                config = {
                    "auth": {"providers": ["dev"]},
                    "federation": {"when_not_hot": "hold", "status_interval": 2},
                    "endpoints": [
                        {"cluster": "direct", "framework": "vllm", "models": [MODEL], "base_url": simulator.base_url},
                        {
                            "cluster": "parsl",
                            "framework": "vllm",
                            "models": [MODEL],
                            "transport": "parsl",
                            "worker_model_server": on_node,
                            "parsl": {"provider": "local", "init_blocks": 1},
                        },
                        site.endpoint(worker_model_server=on_node),
                    ],
                }
                (work / "state").mkdir()
                gateway = start_gateway(config, work / "state", env={"INFERENCE_GATEWAY_DEV_TOKEN": token, **env})
                try:
                    measure(args, gateway, simulator, headers, site, daemon, service, Client, Executor, httpx)
                finally:
                    gateway.stop()
            finally:
                daemon.stop()
    finally:
        simulator.stop()
    return 0


def measure(
    args: argparse.Namespace,
    gateway: Any,
    simulator: Any,
    headers: dict[str, str],
    site: Any,
    daemon: Any,
    service: Any,
    Client: Any,
    Executor: Any,
    httpx: Any,
) -> None:
    from gateway.config import GlobusComputeSettings

    base = f"http://127.0.0.1:{gateway.port}/resource_server"
    paths = {name: f"{base}/{name}/vllm/v1" for name in ("direct", "parsl", "globus")}
    for url in paths.values():
        whole(url, headers, 32, 8)
        first_tokens(url, headers, 2)

    print(f"load: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} cores; the machine is shared")
    for concurrency in (1, *(int(n) for n in str(args.concurrency).split(","))):
        print(f"whole answers, one token: {args.requests} per path, {concurrency} at a time")
        print(f"  {'':10} {'p50 ms':>9} {'p99 ms':>9} {'+p50 ms':>10} {'+p99 ms':>10}   req/s  failed")
        alone, alone_rate, _ = whole(simulator.base_url, {}, args.requests, concurrency)
        print(row("simulator", alone, None) + f" {'':21} {alone_rate:7.1f}")
        results = {}
        for name, url in paths.items():
            latencies, rate, failed = whole(url, headers, args.requests, concurrency)
            results[name] = (latencies, rate)
            print(row(name, latencies, alone) + f" {rate:7.1f} {failed:7d}")
        d50 = percentile(results["direct"][0], 50)
        for name in ("parsl", "globus"):
            ratio = percentile(results[name][0], 50) / d50
            print(f"  {name} p50 is x{ratio:.1f} direct's; {results[name][1] / results['direct'][1]:.2f} of its req/s")

    print(f"streamed answers: time to the first token, {args.streams} per path, one at a time")
    firsts = {name: first_tokens(url, headers, args.streams) for name, url in paths.items()}
    for name, values in firsts.items():
        p50, p99 = percentile(values, 50) * 1e3, percentile(values, 99) * 1e3
        added = p50 - percentile(firsts["direct"], 50) * 1e3
        print(f"  {name:10} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms   +p50 over direct {added:8.2f} ms")

    if args.load_seconds and shutil.which("wrk"):
        loaded(args, paths, simulator.base_url, headers)

    print("the floor: the SDK Executor and the endpoint, without the gateway (the registered status function)")
    request = {"model_server": {"state_dir": str(site.state_dir)}, "scheduler": "none"}
    # The submission rate limits the gateway gives its executors (the SDK's own, 4 per 16 s, would dominate).
    limits = GlobusComputeSettings.model_validate({"endpoint_id": site.endpoint_id})
    with Executor(
        endpoint_id=site.endpoint_id,
        client=Client(),
        api_burst_limit=limits.api_burst_limit,
        api_burst_window_s=limits.api_burst_window,
    ) as executor:
        status_id = site.function_ids["status"]
        executor.submit_to_registered_function(status_id, args=(request,)).result(timeout=60)
        trips = []
        for _ in range(50):
            started = time.perf_counter()
            executor.submit_to_registered_function(status_id, args=(request,)).result(timeout=60)
            trips.append(time.perf_counter() - started)
        started = time.perf_counter()
        futures = [executor.submit_to_registered_function(status_id, args=(request,)) for _ in range(args.tasks)]
        for future in futures:
            future.result(timeout=300)
        rate = args.tasks / (time.perf_counter() - started)
    print(f"  one task at a time: p50 {percentile(trips, 50) * 1e3:.2f} ms, p99 {percentile(trips, 99) * 1e3:.2f} ms")
    print(f"  {args.tasks} tasks submitted at once: {rate:.1f} tasks/s")

    print("cold start: the endpoint restarted, its user endpoint and workers not running")
    daemon.stop()
    daemon.start()
    deadline = time.monotonic() + 60
    while not service.online(site.endpoint_id) or endpoint_state(base, headers, httpx, "globus") == "offline":
        assert time.monotonic() < deadline, "the endpoint did not come back online"
        time.sleep(0.2)
    started = time.perf_counter()
    _, _, failed = whole(paths["globus"], headers, 1, 1)
    cold = time.perf_counter() - started
    after = statistics.fmean(whole(paths["globus"], headers, 5, 1)[0]) * 1e3
    print(f"  first request through globus: {cold:.2f} s{' (failed)' if failed else ''}")
    print(f"  the next five: {after:.1f} ms each on average")


def loaded(args: argparse.Namespace, paths: dict[str, str], simulator_url: str, headers: dict[str, str]) -> None:
    """Requests/s and p50 under ``wrk``'s load, whole and streamed, each path beside the simulator alone."""
    from benchtools import wrk

    for stream in (False, True):
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": args.tokens, "ignore_eos": True, "stream": stream}
        for concurrency in (int(n) for n in str(args.concurrency).split(",")):
            kind = "streamed" if stream else "whole"
            seconds = f"{args.load_seconds:g} s each"
            print(f"wrk, {kind} answers of {args.tokens} tokens, {concurrency} connections, {seconds}")
            print(f"  {'':10} {'req/s':>9} {'p50 ms':>9} {'+p50 ms':>9} {'of direct':>10} {'failed':>7}")
            targets = {"simulator": simulator_url, **paths}
            results = {}
            for name, url in targets.items():
                results[name] = wrk(
                    f"{url}/chat/completions",
                    body,
                    connections=concurrency,
                    seconds=args.load_seconds,
                    headers={} if name == "simulator" else headers,
                )
            direct = results["direct"]
            for name, result in results.items():
                added = result["p50"] - results["simulator"]["p50"]
                share = result["rps"] / direct["rps"]
                print(
                    f"  {name:10} {result['rps']:9.1f} {result['p50']:9.2f} {added:9.2f} {share:10.2f} "
                    f"{result['failed']:7d}"
                )


def endpoint_state(base: str, headers: dict[str, str], httpx: Any, cluster: str) -> str:
    views = httpx.get(f"{base}/list-endpoints", headers=headers, timeout=10).json()["data"]
    return str(next(view["state"] for view in views if view["cluster"] == cluster))


if __name__ == "__main__":
    sys.exit(main())
