#!/usr/bin/env python3
"""What one client sending a huge request header does to everyone else: /health latency meanwhile.

    python scripts/bench-huge-header.py [--megabytes 120] [--probes 200]

Starts a simulator and the gateway in front of it; one thread sends requests whose single header is
``--megabytes`` long, as fast as the socket takes them, one after the other until ``--probes`` requests to
``/resource_server/health`` (every 20 ms, each on a new connection) are done. Prints how long the first huge request
took to be answered, what it got, how many were sent, and the /health latency (p50, p99, max) meanwhile.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchtools import start_gateway  # noqa: E402

from compute_functions.model_server import ModelServer  # noqa: E402
from gateway.simulator import command as simulator_command  # noqa: E402

MODEL = "facebook/opt-125m"


def send_huge(port: int, megabytes: int, outcome: dict[str, object]) -> None:
    began = time.perf_counter()
    piece = b"a" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        try:
            connection.sendall(b"GET /resource_server/health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
            for _ in range(megabytes):
                connection.sendall(piece)
            connection.sendall(b"\r\n\r\n")
        except OSError as exc:
            outcome["send"] = f"stopped after the gateway closed: {exc.__class__.__name__}"
        connection.settimeout(120)
        try:
            answer = connection.recv(65536)
        except OSError as exc:
            answer = f"({exc.__class__.__name__})".encode()
    outcome["seconds"] = time.perf_counter() - began
    outcome["answer"] = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(connection closed, no answer)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=120)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-huge-header-"))
    simulator = ModelServer(simulator_command(MODEL), log_path=work / "simulator.log")
    simulator.start(timeout=30)
    endpoint = {"cluster": "local", "framework": "vllm", "models": [MODEL], "base_url": simulator.base_url}
    gateway = start_gateway({"endpoints": [endpoint]}, work)
    try:
        outcome: dict[str, object] = {}
        probing = threading.Event()
        probing.set()
        sent = 0

        def keep_sending() -> None:
            nonlocal sent
            while probing.is_set():
                send_huge(gateway.port, args.megabytes, outcome if not sent else {})
                sent += 1

        sender = threading.Thread(target=keep_sending)
        latencies = []
        sender.start()
        with httpx.Client(timeout=120) as client:
            for _ in range(args.probes):
                began = time.perf_counter()
                client.get(f"http://127.0.0.1:{gateway.port}/resource_server/health", headers={"connection": "close"})
                latencies.append(time.perf_counter() - began)
                time.sleep(0.02)
        probing.clear()
        sender.join()
    finally:
        gateway.stop()
        simulator.stop()
    latencies.sort()
    print(f"huge header of {args.megabytes} MB: answered in {outcome['seconds']:.2f} s with {outcome['answer']!r}")
    print(f"  {sent} such requests sent while /health was probed")
    if "send" in outcome:
        print(f"  sending {outcome['send']}")
    print(
        f"/health during it ({len(latencies)} probes): p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
