#!/usr/bin/env python3
"""What accounting and observability cost, measured side by side in one run, in front of one simulator:

- off: the usage log, the access log, metrics and rate limits all off;
- accounting: the usage log (SQLite) on, the rest off;
- on: all of them on (limits set high enough never to refuse: what is measured is their bookkeeping).

    python scripts/bench-observability.py [--connections 64] [--rounds 7] [--duration 5] [--min-ratio 0.9]
    python scripts/bench-observability.py --instructions 4000

The gateways run at once; wrk (Debian package `wrk`) loads them in turns, round after round and in alternating
order, so that a change in the machine's load falls on all alike. Prints each round's requests/s, the medians, the
gateway's CPU time per request (its usage writer's included), and the ratios to off, for whole and streamed
answers. Exits 1 when whole or streamed answers with everything on fall below --min-ratio of off.

Requests/s on a shared machine move by a quarter from one round to the next. With --instructions N, each setting
(and each part alone) runs under valgrind's callgrind instead, which counts the instructions the gateway's process
executes (every thread, user space) for N requests after a warm-up: the same count on a busy machine as on an idle
one. Prints instructions per request and what each part adds to off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchtools import cpu_seconds, group_cpu_seconds, need_wrk, wrk  # noqa: E402

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.cli import serve_command  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token"

HEADERS = {"authorization": f"Bearer {TOKEN}"}

OFF = {
    "database": {"usage_log": False},
    "logging": {"access_log": False},
    "metrics": {"enabled": False},
}
ACCOUNTING = {**OFF, "database": {"usage_log": True}}
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
SETTINGS = {"off": OFF, "accounting": ACCOUNTING, "on": ON}
# Each part alone, for --instructions: what it adds to off (the observing middleware comes with any of them).
PARTS = {
    "usage log": ACCOUNTING,
    "limits": {**OFF, "limits": ON["limits"]},
    "metrics": {**OFF, "metrics": {"enabled": True}},
    "access log": {**OFF, "logging": ON["logging"]},
}


class RoundFailed(Exception):
    """wrk saw errors: the round does not count."""


def start_gateway(
    name: str, backend: str, work: Path, settings: dict[str, Any] | None = None, wrapper: tuple[str, ...] = ()
) -> ModelServer:
    slug = name.replace(" ", "-")
    config = work / f"{slug}.yaml"
    config.write_text(
        json.dumps(
            {
                "endpoints": [{"cluster": "local", "framework": "vllm", "models": [MODEL], "base_url": backend}],
                # A connection lost to the simulator marks it offline until the next status check: keep that short.
                "federation": {"status_interval": 1.0, "status_jitter": 0.0},
                **(settings if settings is not None else SETTINGS[name]),
            }
        )
    )
    server = ModelServer(
        [*wrapper, *serve_command(config)],
        health_path="/resource_server/health",
        env={"INFERENCE_GATEWAY_DEV_TOKEN": TOKEN, "INFERENCE_GATEWAY_STATE_DIR": str(work / slug)},
        log_path=work / f"{slug}.log",
    )
    server.start(timeout=600 if wrapper else 60)
    return server


def keep_warm(urls: list[str], stop: threading.Event) -> None:
    """A request to every gateway each second, so that no gateway's pooled connections to the simulator sit idle
    past its 5 s keep-alive while the others are measured (the first requests on stale ones would fail)."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    headers = {"content-type": "application/json", **HEADERS}
    while not stop.wait(1.0):
        for url in urls:
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=10) as answer:
                answer.read()


def measure(server: ModelServer, url: str, body: dict[str, Any], args: argparse.Namespace) -> tuple[float, float]:
    """Requests/s and the gateway's CPU microseconds per request for one round; a failed round is run again.

    The CPU time is that of the gateway's process group: the serving process and its usage writer."""
    assert server.process is not None
    for attempt in range(3):
        before = group_cpu_seconds(server.process.pid)
        try:
            result = wrk(
                url, body, connections=args.connections, seconds=args.duration, headers=HEADERS, fail_with=RoundFailed
            )
        except RoundFailed as failed:
            print(f"round again ({failed.args[0].splitlines()[0]})", file=sys.stderr)
            time.sleep(2.0 * (attempt + 1))
            continue
        return result["rps"], (group_cpu_seconds(server.process.pid) - before) / result["requests"] * 1e6
    raise SystemExit(f"three rounds in a row failed against {url}")


async def drive(port: int, body: bytes, requests: int, connections: int) -> None:
    """``requests`` POSTs over ``connections`` kept-alive connections, each answer read to its end."""
    head = (
        f"POST /resource_server/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TOKEN}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()

    async def client(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(head + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            if not answer.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"the gateway answered {answer.splitlines()[0]!r}")
            if b"chunked" in answer.lower():
                await reader.readuntil(b"\r\n0\r\n\r\n")
            else:
                length = re.search(rb"(?i)content-length: *(\d+)", answer)
                assert length is not None
                await reader.readexactly(int(length.group(1)))
        writer.close()

    await asyncio.gather(*(client(requests // connections) for _ in range(connections)))


def idle(pid: str) -> None:
    """Wait until process ``pid`` uses less than a tenth of a CPU second in a second."""
    before = cpu_seconds(int(pid))
    while True:
        time.sleep(1.0)
        now = cpu_seconds(int(pid))
        if now - before < 0.1:
            return
        before = now


def count_instructions(
    name: str, settings: dict[str, Any], backend: str, args: argparse.Namespace, work: Path
) -> dict[str, tuple[float, float]]:
    """Instructions per request of one gateway under callgrind, for whole and for streamed answers: those of the
    serving process, and those of its usage writer process."""
    out = work / f"callgrind-{name.replace(' ', '-')}"
    wrapper = (
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        "--dump-instr=no",
        f"--callgrind-out-file={out}.%p",
    )
    server = start_gateway(name, backend, work, settings, wrapper)
    assert server.process is not None
    serving = str(server.process.pid)
    children = subprocess.run(["pgrep", "-P", serving], capture_output=True, text=True).stdout.split()
    figures: dict[str, tuple[float, float]] = {}
    try:
        for part, (mode, extra) in enumerate((("whole", {}), ("streamed", {"stream": True})), start=1):
            body = json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "Explain quantum computing"}],
                 "max_tokens": args.chunks, **extra}
            ).encode()  # fmt: skip
            asyncio.run(drive(server.port, body, 400, 8))
            for pid in children:
                idle(pid)  # the writer has started (slow under valgrind) and caught up with the warm-up
            for pid in (serving, *children):
                subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
            asyncio.run(drive(server.port, body, args.instructions, 16))
            for pid in children:
                idle(pid)
            counted = []
            for pid in (serving, *children):
                subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
                dump = Path(f"{out}.{pid}.{part}")
                for _ in range(100):
                    if dump.exists() and "summary:" in dump.read_text():
                        break
                    time.sleep(0.1)
                summary = re.search(r"^summary: (\d+)", dump.read_text(), re.M)
                assert summary is not None, dump
                counted.append(int(summary.group(1)) / (args.instructions // 16 * 16))
            figures[mode] = (counted[0], sum(counted[1:]))
    finally:
        server.stop()
    return figures


def instructions(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is needed: apt-get install -y valgrind")
    work = Path(tempfile.mkdtemp(prefix="bench-observability-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=60)
    configurations = {**SETTINGS, **PARTS}
    try:
        # The counts do not depend on how busy the machine is, so the gateways run side by side.
        with ThreadPoolExecutor(len(configurations)) as pool:
            futures = {
                name: pool.submit(count_instructions, name, settings, simulator.base_url, args, work)
                for name, settings in configurations.items()
            }
            counts = {name: future.result() for name, future in futures.items()}
    finally:
        simulator.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"instructions per request (callgrind, {args.instructions} requests after 400 of warm-up, 16 connections)")
    print("serving: the gateway's own process; writer: its usage writer process, on another core\n")
    print(f"{'setting':<14}{'whole':>11}{'added':>8}{'writer':>9}{'streamed':>11}{'added':>8}{'writer':>9}")
    for name, figures in counts.items():
        cells = ""
        for mode in ("whole", "streamed"):
            serving, writer = figures[mode]
            cells += f"{serving:>11,.0f}{serving / counts['off'][mode][0] - 1:>+8.1%}{writer:>9,.0f}"
        print(f"{name:<14}{cells}")
    whole = counts["off"]["whole"][0] / counts["on"]["whole"][0]
    print(
        f"\nwith everything on, the serving process's CPU serves {whole:.3f} of the whole answers it serves with it off"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=5, help="seconds per gateway per round")
    parser.add_argument("--chunks", type=int, default=16, help="output tokens (stream chunks) per answer")
    parser.add_argument("--min-ratio", type=float, default=0.9)
    parser.add_argument("--instructions", type=int, metavar="N", help="count instructions for N requests instead")
    args = parser.parse_args()
    if args.instructions:
        return instructions(args)
    need_wrk()

    work = Path(tempfile.mkdtemp(prefix="bench-observability-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=60)
    gateways = {name: start_gateway(name, simulator.base_url, work) for name in SETTINGS}
    urls = {
        name: f"http://127.0.0.1:{server.port}/resource_server/v1/chat/completions" for name, server in gateways.items()
    }
    stop = threading.Event()
    warmer = threading.Thread(target=keep_warm, args=(list(urls.values()), stop), daemon=True)
    warmer.start()
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Explain quantum computing"}],
        "max_tokens": args.chunks,
    }
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        for mode, extra in (("whole", {}), ("streamed", {"stream": True})):
            results[mode] = {name: [] for name in gateways}
            for url in urls.values():
                wrk(url, {**body, **extra}, connections=args.connections, seconds=2, headers=HEADERS)  # warm-up
            for index in range(args.rounds):
                names = list(gateways) if index % 2 == 0 else list(reversed(gateways))
                for name in names:
                    results[mode][name].append(measure(gateways[name], urls[name], {**body, **extra}, args))
        stop.set()
        warmer.join()
        time.sleep(1.5)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gateways['on'].port}/metrics", timeout=10).read().decode()
    finally:
        stop.set()
        for server in gateways.values():
            server.stop()
        simulator.stop()

    def value(name: str) -> float:
        match = re.search(rf"^{name} ([\d.e+]+)$", metrics, re.M)
        return float(match.group(1)) if match else float("nan")

    print(
        f"{args.connections} connections, {args.rounds} rounds of {args.duration} s per gateway, "
        f"{args.chunks} tokens per answer\n"
    )
    ratios: dict[str, dict[str, float]] = {}
    for mode, runs in results.items():
        print(f"{mode}:")
        medians = {name: statistics.median(rps for rps, _ in rounds) for name, rounds in runs.items()}
        for name, rounds in runs.items():
            listed = " ".join(f"{rps:6.0f}" for rps, _ in rounds)
            print(
                f"  {name:<10} req/s {listed}   median {medians[name]:6.0f} ({medians[name] / medians['off']:.3f})"
                f"   CPU/request median {statistics.median(cpu for _, cpu in rounds):5.1f} us"
            )
        # Each round's gateways ran back to back, so a round's own ratio is the least touched by the machine's
        # other work; their median is the figure that counts.
        ratios[mode] = {
            name: statistics.median(rps / off for (rps, _), (off, _) in zip(rounds, runs["off"], strict=True))
            for name, rounds in runs.items()
        }
        print(
            f"  median of the rounds' ratios to off: accounting {ratios[mode]['accounting']:.3f}, "
            f"on {ratios[mode]['on']:.3f}"
        )
        on_accounting = statistics.median(
            on / accounting for (on, _), (accounting, _) in zip(runs["on"], runs["accounting"], strict=True)
        )
        print(f"  logging, metrics and limits on top of accounting: {on_accounting:.3f} of accounting alone\n")
    print(
        f"usage rows written {value('gateway_usage_rows_written_total'):.0f}, "
        f"dropped {value('gateway_usage_rows_dropped_total'):.0f}, "
        f"access log lines {sum(1 for line in (work / 'on.log').open() if line.startswith('{'))}"
    )
    # Hundreds of megabytes of logs and usage rows by now.
    shutil.rmtree(work, ignore_errors=True)
    within = True
    for mode in ("whole", "streamed"):
        ratio = ratios[mode]["on"]
        verdict = "within" if ratio >= args.min_ratio else "OUTSIDE"
        within = within and ratio >= args.min_ratio
        print(f"{mode} answers with everything on: {ratio:.3f} of off ({verdict} the {args.min_ratio:.2f} budget)")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
