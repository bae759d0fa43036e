#!/usr/bin/env python3
"""Batch throughput and memory: a large batch through the gateway against the simulator, next to direct requests.

    .venv/bin/python scripts/bench-batches.py [--lines 100000] [--concurrency 64] [--transport parsl|direct]

1. Direct requests: a closed-loop aiohttp client on uvloop keeps ``--concurrency`` requests in flight against a
   simulator, for the first ``--direct-lines`` lines of the input: the rate the simulator serves at that
   concurrency. It is measured before and after the batch, and the mean is the reference.
2. The batch: a gateway (``inference-gateway serve``) runs the whole file as one batch on an endpoint of
   ``--transport`` with the same simulator settings and ``batches.concurrency`` = ``--concurrency``. A 10-line batch
   first starts the workers and the model server, so the figure is the batch's own. The rate counts from the
   submission (which counts the file's lines) to the moment the gateway reports the batch completed.

The resident memory (VmRSS) of the gateway and of the worker running the batch is sampled every half second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.cli import serve_command  # noqa: E402
from gateway.simulator import command  # noqa: E402

MODEL = "facebook/opt-125m"
TOKEN = "bench-token-0123456789"


def simulator_command(args: argparse.Namespace) -> list[str]:
    return command(MODEL, options=("--ttft", str(args.ttft), "--tpot", str(args.tpot), "--max-num-seqs", "1024"))


def write_input(path: Path, lines: int, max_tokens: int) -> None:
    with open(path, "w") as handle:
        for index in range(lines):
            body = {"messages": [{"role": "user", "content": f"Question number {index}?"}], "max_tokens": max_tokens}
            handle.write(json.dumps(body) + "\n")


async def direct_rate(base_url: str, bodies: list[bytes], concurrency: int) -> float:
    """Requests a second that a closed loop of ``concurrency`` clients gets from the server."""
    queue = iter(bodies)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client() -> None:
            for body in queue:
                async with session.post(f"{base_url}/chat/completions", data=body, headers=headers) as answer:
                    await answer.read()
                    assert answer.status == 200

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - began)


def measure_direct(args: argparse.Namespace, bodies: list[bytes], work: Path) -> float:
    """The direct rate against a fresh simulator; measured before and after the batch, as the machine may drift."""
    simulator = ModelServer(simulator_command(args), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(direct_rate(simulator.base_url, bodies[:1000], args.concurrency))
            return runner.run(direct_rate(simulator.base_url, bodies, args.concurrency))
    finally:
        simulator.stop()


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pid(gateway_pid: int, transport: str) -> int | None:
    """The process running the batch: the gateway's batch child (direct), or the busiest Parsl worker."""
    if transport == "direct":
        candidates = [pid for pid in descendants(gateway_pid) if "compute_functions.batch" in command_line(pid)]
    else:
        pools = [
            int(entry.name)
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and "process_worker_pool" in command_line(int(entry.name))
        ]
        candidates = [pid for pool in pools for pid in descendants(pool) if "simulator" not in command_line(pid)]
    sized = [(rss_mb(pid) or 0.0, pid) for pid in candidates]
    return max(sized)[1] if sized else None


class Sampler:
    """VmRSS of the gateway and the batch's worker, every half second."""

    def __init__(self, gateway_pid: int, transport: str) -> None:
        self.gateway_pid = gateway_pid
        self.transport = transport
        self.gateway: list[float] = []
        self.worker: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            if (gateway := rss_mb(self.gateway_pid)) is not None:
                self.gateway.append(gateway)
            pid = worker_pid(self.gateway_pid, self.transport)
            if pid is not None and (worker := rss_mb(pid)) is not None:
                self.worker.append(worker)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_batch(api: str, source: Path, output: Path) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {TOKEN}"}
    body = {"input_file_path": str(source), "output_folder_path": str(output), "model": MODEL}
    started = time.perf_counter()
    batch: dict[str, Any] = httpx.post(f"{api}/batches", headers=headers, json=body, timeout=600).json()
    while batch.get("status") not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        batch = httpx.get(f"{api}/batches/{batch['id']}", headers=headers, timeout=60).json()
    batch["seconds"] = time.perf_counter() - started
    return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--direct-lines", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--transport", choices=["parsl", "direct"], default="parsl")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--ttft", type=float, default=0.0)
    parser.add_argument("--tpot", type=float, default=0.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-batches-"))
    source = work / "input.jsonl"
    write_input(source, args.lines, args.max_tokens)
    warm = work / "warm.jsonl"
    write_input(warm, 10, args.max_tokens)
    with open(source, "rb") as handle:
        bodies = [handle.readline().strip() for _ in range(min(args.direct_lines, args.lines))]
    print(f"input: {args.lines} lines, {source.stat().st_size / 1e6:.1f} MB; concurrency {args.concurrency}")

    before = measure_direct(args, bodies, work)

    settings: dict[str, Any] = {"cluster": "local", "framework": "vllm", "models": [MODEL]}
    backend = None
    if args.transport == "parsl":
        launch = {"command": simulator_command(args), "startup_timeout": 60, "idle_timeout": 600}
        settings.update(transport="parsl", worker_model_server=launch, parsl={"provider": "local"})
    else:
        backend = ModelServer(simulator_command(args), log_path=work / "backend.log")
        backend.start(timeout=30)
        settings["base_url"] = backend.base_url
    config = {
        "auth": {"providers": ["dev"]},
        "endpoints": [settings],
        "database": {"usage_log": False},
        "batches": {"allowed_roots": [str(work)], "concurrency": args.concurrency, "max_lines": args.lines},
    }
    (work / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = ModelServer(
        serve_command(work / "gateway.yaml"),
        health_path="/resource_server/health",
        env={"INFERENCE_GATEWAY_STATE_DIR": str(work / "state"), "INFERENCE_GATEWAY_DEV_TOKEN": TOKEN},
        log_path=work / "gateway.log",
    )
    gateway.start(timeout=60)
    try:
        api = f"http://127.0.0.1:{gateway.port}/resource_server/v1"
        assert gateway.process is not None
        run_batch(api, warm, work / "out")
        with Sampler(gateway.process.pid, args.transport) as memory:
            batch = run_batch(api, source, work / "out")
    finally:
        gateway.stop()
        if backend is not None:
            backend.stop()
    after = measure_direct(args, bodies, work)
    direct = (before + after) / 2
    print(
        f"direct requests:        {direct:8.0f} req/s ({len(bodies)} requests; {before:.0f} before, {after:.0f} after)"
    )
    counts = batch["request_counts"]
    rate = counts["completed"] / batch["seconds"]
    print(
        f"batch through {args.transport}: {rate:8.0f} req/s ({counts['completed']} answered, {counts['failed']} failed "
        f"in {batch['seconds']:.1f} s, status {batch['status']})"
    )
    print(f"ratio batch / direct:   {rate / direct:8.2f}")
    for name, samples in (("gateway", memory.gateway), ("worker", memory.worker)):
        if samples:
            print(
                f"{name} RSS MB: start {samples[0]:.0f}, peak {max(samples):.0f}, end {samples[-1]:.0f}"
                f" ({len(samples)} samples)"
            )
    print(f"files in {work}")
    return 0 if batch["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
