"""Side by side in one run: the ``direct`` and ``parsl`` transports in front of the same simulator.

    .venv/bin/python scripts/bench-dispatch.py [--requests 400] [--streams 40] [--tokens 100] [--tpot 0.005]

It starts a simulator, a pass-through proxy in front of it that notes when it forwards each streamed event, and a
gateway with two endpoints on that proxy: ``direct/vllm`` (plain HTTP) and ``parsl/vllm`` (a local Parsl worker
runs the compute function, which finds the model server already running on its port). Then, one request at a time:

- whole answers of one token: latency percentiles for the simulator alone, direct and parsl;
- streamed answers: each event's delay from the proxy to the client, the gaps between events, and the time to the
  first event. The relay's added delay per event is the parsl delay minus the direct one.

Clocks: every process reads CLOCK_MONOTONIC (``time.perf_counter`` on Linux), so times compare across them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = "facebook/opt-125m"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]


# The proxy (a separate process) ----------------------------------------------------------------------------------


def proxy_main(listen: int, upstream: int) -> None:
    """Forward everything to the simulator; note when each streamed event with choices leaves for the gateway."""
    from aiohttp import ClientSession, ClientTimeout, web

    sent: dict[str, float] = {}

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.path == "/_sent":
            body = json.dumps(sent).encode()
            sent.clear()
            return web.Response(body=body, content_type="application/json")
        session: ClientSession = request.app["session"]
        data = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        url = f"http://127.0.0.1:{upstream}{request.path_qs}"
        async with session.request(request.method, url, data=data, headers=headers) as answer:
            if answer.content_type != "text/event-stream":
                return web.Response(body=await answer.read(), status=answer.status, content_type=answer.content_type)
            response = web.StreamResponse(status=answer.status, headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            pending = b""
            async for chunk in answer.content.iter_any():
                pending += chunk
                while b"\n\n" in pending:
                    event, pending = pending.split(b"\n\n", 1)
                    await response.write(event + b"\n\n")
                    key = event_key(event)
                    if key:
                        sent[key] = time.perf_counter()
            await response.write_eof()
            return response

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(timeout=ClientTimeout(total=None))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    web.run_app(app, host="127.0.0.1", port=listen, print=None, access_log=None)


_counts: dict[str, int] = {}


def event_key(event: bytes) -> str | None:
    """``response id/n`` for the n-th event with choices of a stream; the proxy and the client count alike."""
    if not event.startswith(b"data: {"):
        return None
    chunk = json.loads(event[6:])
    if not chunk.get("choices"):
        return None
    n = _counts.get(chunk["id"], 0)
    _counts[chunk["id"]] = n + 1
    return f"{chunk['id']}/{n}"


# The measurement -------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def whole_latencies(url: str, headers: dict[str, str], count: int) -> list[float]:
    import httpx

    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 1}
    latencies = []
    with httpx.Client(headers=headers, timeout=60) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = client.post(f"{url}/chat/completions", json=body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
    return latencies


def streamed(url: str, headers: dict[str, str], count: int, tokens: int) -> dict[str, Any]:
    """Arrival time of each event, first-event times and gaps over ``count`` streams."""
    import httpx

    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    arrived: dict[str, float] = {}
    first: list[float] = []
    gaps: list[float] = []
    with httpx.Client(headers=headers, timeout=60) as client:
        for _ in range(count):
            started = time.perf_counter()
            previous = None
            with client.stream("POST", f"{url}/chat/completions", json=body) as response:
                response.raise_for_status()
                pending = b""
                for data in response.iter_raw():
                    now = time.perf_counter()
                    pending += data
                    while b"\n\n" in pending:
                        event, pending = pending.split(b"\n\n", 1)
                        key = event_key(event)
                        if key is None:
                            continue
                        arrived[key] = now
                        if previous is None:
                            first.append(now - started)
                        else:
                            gaps.append(now - previous)
                        previous = now
    return {"arrived": arrived, "first": first, "gaps": gaps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="whole answers per path")
    parser.add_argument("--streams", type=int, default=40, help="streamed answers per path")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per streamed answer")
    parser.add_argument("--tpot", type=float, default=0.005, help="the simulator's time per output token")
    parser.add_argument("--proxy", nargs=2, type=int, metavar=("LISTEN", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy:
        proxy_main(*args.proxy)
        return 0

    import httpx
    import yaml

    from compute_functions.model_server import ModelServer, free_port
    from gateway.cli import serve_command
    from gateway.simulator import command as simulator_command

    work = Path(tempfile.mkdtemp(prefix="bench-dispatch-"))
    simulator = ModelServer(
        simulator_command(MODEL, options=("--tpot", str(args.tpot))),
        log_path=work / "simulator.log",
    )
    proxy_port = free_port()
    proxy = ModelServer(
        [sys.executable, __file__, "--proxy", str(proxy_port), str(simulator.port)],
        port=proxy_port,
        log_path=work / "proxy.log",
    )
    token = os.urandom(16).hex()
    behind_proxy = f"http://127.0.0.1:{proxy_port}/v1"
    config = {
        "auth": {"providers": ["dev"]},
        "federation": {"when_not_hot": "hold"},
        "endpoints": [
            {"cluster": "direct", "framework": "vllm", "models": [MODEL], "base_url": behind_proxy},
            {
                "cluster": "parsl",
                "framework": "vllm",
                "models": [MODEL],
                "transport": "parsl",
                # The port answers already, so the compute function uses that server and never starts one.
                "worker_model_server": {"command": ["true"], "port": proxy_port, "state_dir": str(work / "servers")},
                "parsl": {"provider": "local", "requests_per_node": 8, "init_blocks": 1, "min_blocks": 1},
            },
        ],
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = ModelServer(
        serve_command(work / "gateway.yaml"),
        health_path="/resource_server/health",
        log_path=work / "gateway.log",
        env={"INFERENCE_GATEWAY_STATE_DIR": str(work / "state"), "INFERENCE_GATEWAY_DEV_TOKEN": token},
    )
    headers = {"authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{gateway.port}/resource_server"
    paths = {"direct": f"{base}/direct/vllm/v1", "parsl": f"{base}/parsl/vllm/v1"}
    try:
        simulator.start(30)
        proxy.start(30)
        gateway.start(60)
        for url in paths.values():
            whole_latencies(url, headers, 20)
            streamed(url, headers, 2, 10)
        httpx.get(f"http://127.0.0.1:{proxy_port}/_sent")

        print(f"whole answers: {args.requests} per path, one token, one request at a time")
        latency = {"simulator": whole_latencies(f"http://127.0.0.1:{simulator.port}/v1", {}, args.requests)}
        for name, url in paths.items():
            latency[name] = whole_latencies(url, headers, args.requests)
        print(f"  {'':10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for name, values in latency.items():
            print(
                f"  {name:10} {percentile(values, 50) * 1e3:8.2f} {percentile(values, 99) * 1e3:8.2f} "
                f"{statistics.fmean(values) * 1e3:8.2f}"
            )
        added = (percentile(latency["parsl"], 50) - percentile(latency["direct"], 50)) * 1e3
        ratio = percentile(latency["parsl"], 50) / percentile(latency["direct"], 50)
        print(f"  parsl adds {added:.2f} ms at p50 over direct (x{ratio:.2f}); limit 10 ms")

        print(f"streamed answers: {args.streams} per path, {args.tokens} tokens, tpot {args.tpot * 1e3:g} ms")
        results = {}
        for name, url in paths.items():
            result = streamed(url, headers, args.streams, args.tokens)
            sent = httpx.get(f"http://127.0.0.1:{proxy_port}/_sent").json()
            result["delays"] = [result["arrived"][key] - sent[key] for key in result["arrived"] if key in sent]
            results[name] = result
        print(f"  {'':10} {'delay p50':>10} {'delay p99':>10} {'gap p50':>8} {'gap p99':>8} {'first p50':>10}  (ms)")
        for name, result in results.items():
            delays, gaps, first = result["delays"], result["gaps"], result["first"]
            print(
                f"  {name:10} {percentile(delays, 50) * 1e3:10.3f} {percentile(delays, 99) * 1e3:10.3f} "
                f"{percentile(gaps, 50) * 1e3:8.2f} {percentile(gaps, 99) * 1e3:8.2f} "
                f"{percentile(first, 50) * 1e3:10.2f}"
            )
        relay = (percentile(results["parsl"]["delays"], 50) - percentile(results["direct"]["delays"], 50)) * 1e3
        print(f"  the relay adds {relay:.3f} ms per event at p50 over direct; limit 2 ms")
        first_added = (percentile(results["parsl"]["first"], 50) - percentile(results["direct"]["first"], 50)) * 1e3
        print(f"  parsl adds {first_added:.2f} ms to the first event at p50 (task submission and relay set-up)")
    finally:
        gateway.stop()
        proxy.stop()
        simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
