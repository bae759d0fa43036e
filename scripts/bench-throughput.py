"""Throughput side by side in one run: the simulator reached directly, the ``direct`` transport, the embedded default.

    .venv/bin/python scripts/bench-throughput.py [--duration 8] [--concurrency 32 128] [--tokens 16 64] [--rounds 1]
    .venv/bin/python scripts/bench-throughput.py --memory 256      # memory of the workers with 256 requests in flight
    .venv/bin/python scripts/bench-throughput.py --cold-start      # first answer of a fresh `inference-gateway serve`

It needs ``wrk`` (Debian: ``apt-get install wrk``), a load generator in C that does not bottleneck here; a Python
client tops out far below the gateway. The run first measures ``wrk`` alone against the simulator with no delays,
with the CPU time it used, so a generator limit would show.

Two simulators run: one with model-like timing (20 ms to the first token, 5 ms per further token) and one that
answers at once. One gateway serves, for each simulator, a ``direct`` endpoint on it and a ``parsl`` endpoint with
the embedded default's ``parsl`` and ``worker_model_server`` settings (``endpoint_configs/local.yaml``), pointed at
the simulator's port so its workers use that server. For each case, the three paths are measured one after the
other in the same run, whole answers and streamed ones; requests/s, latency p50/p99 and failures are printed, with
the ratios the targets speak of, and ``busy``, the share of the machine's cores busy during the figure: at 100% every
process queues for a core, and the latency a path adds grows with the CPU it costs more than with its design.
``cores allow`` is the most requests/s the machine's cores can serve on that path: the cores divided by the CPU one
request costs all the processes on it (gateway, request server, simulator and ``wrk``). Where it is below 90% of
the simulator's rate, the path cannot reach that share on this machine, whatever its design.

Requests/s is the closed loop's steady rate, ``wrk``'s connections divided by its mean latency (Little's law), and
``counted`` is what ``wrk`` counted in the run. The count is coarse when an answer takes a large share of the run:
all connections start together and answer at nearly the same pace, so each finishes a whole number of rounds (32
connections of 363 ms answers finish 13 rounds in 5 s, 83 req/s; of 353 ms answers, 14 rounds, 90 req/s).
"""

from __future__ import annotations

import argparse
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

from benchtools import cpu_seconds, start_gateway, wrk, wrk_script  # noqa: E402

MODEL = "facebook/opt-125m"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
MODEL_LIKE = ("--ttft", "0.02", "--tpot", "0.005")


def state(work: Path) -> Path:
    """The gateway's folder in the run's: its configuration, log and state."""
    (work / "state").mkdir(exist_ok=True)
    return work / "state"


def request_server(work: Path, name: str) -> int | None:
    """The pid of the request server of the ``parsl`` endpoint on simulator ``name`` (its state directory)."""
    marker = str(work / name).encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"serve_node" in command and marker in command:
                return int(entry)
    return None


def chat(tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": QUESTION, "max_tokens": tokens, "ignore_eos": True}
    if stream:
        body["stream"] = True
    return body


def embedded_default() -> dict[str, Any]:
    import yaml

    from gateway.config import DEFAULT_CONFIG

    config: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())
    return config


def gateway_config(ports: dict[str, int], work: Path, requests_per_node: int | None = None) -> dict[str, Any]:
    """For each simulator, a ``direct`` endpoint on it and the embedded default's ``parsl`` endpoint on its port."""
    default = embedded_default()["endpoints"][0]
    endpoints = []
    for name, port in ports.items():
        endpoints.append(
            {
                "cluster": f"{name}-direct",
                "framework": "vllm",
                "models": [MODEL],
                "base_url": f"http://127.0.0.1:{port}/v1",
            }
        )
        parsl = dict(default["parsl"])
        if requests_per_node is not None:
            parsl["requests_per_node"] = requests_per_node
        endpoints.append(
            {
                "cluster": f"{name}-parsl",
                "framework": "vllm",
                "models": [MODEL],
                "transport": "parsl",
                # The port answers already, so the workers use that server and start none.
                "worker_model_server": {**default["worker_model_server"], "port": port, "state_dir": str(work / name)},
                "parsl": parsl,
            }
        )
    return {"auth": {"providers": ["dev"]}, "federation": {"when_not_hot": "hold"}, "endpoints": endpoints}


def start_simulator(work: Path, name: str, options: tuple[str, ...]) -> Any:
    from compute_functions.model_server import ModelServer
    from gateway.simulator import command

    simulator = ModelServer(command(MODEL, options=options), log_path=work / f"{name}.log")
    simulator.start(30)
    return simulator


def print_table(title: str, rows: dict[str, dict[str, Any]], reference: str) -> None:
    print(f"  {title}")
    print(
        f"    {'':10} {'req/s':>8} {'counted':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} {'x ' + reference:>12} "
        f"{'busy':>5} {'cores allow':>11}   CPU µs per request: gateway, request server, simulator, wrk"
    )
    base = rows[reference]["steady_rps"]
    for name, row in rows.items():
        print(
            f"    {name:10} {row['steady_rps']:8.1f} {row['rps']:8.1f} {row['p50']:8.2f} {row['p99']:8.2f} "
            f"{row['failed']:6d} {row['steady_rps'] / base:12.2f} {row['busy']:5.0%} {allowed(row):11.1f}   "
            + " ".join(f"{row[f'cpu_{process}']:7.0f}" for process in ("gateway", "request_server", "simulator", "wrk"))
        )


def allowed(row: dict[str, Any]) -> float:
    """The requests/s the machine's cores can serve at most on a path: all of them divided by the CPU one request
    costs every process on it, the load generator's included."""
    spent = sum(row[f"cpu_{process}"] for process in ("gateway", "request_server", "simulator", "wrk"))
    return (os.cpu_count() or 1) / spent * 1e6 if spent else 0.0


def throughput(args: argparse.Namespace) -> int:
    import httpx

    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    token = os.urandom(16).hex()
    auth = {"authorization": f"Bearer {token}"}
    simulators = {
        "model": start_simulator(work, "model", MODEL_LIKE),
        "instant": start_simulator(work, "instant", ()),
    }
    gateway = None
    try:
        ports = {name: simulator.port for name, simulator in simulators.items()}
        gateway = start_gateway(gateway_config(ports, work), state(work), env={"INFERENCE_GATEWAY_DEV_TOKEN": token})
        base = f"http://127.0.0.1:{gateway.port}/resource_server"

        def paths(name: str) -> dict[str, tuple[str, dict[str, str]]]:
            return {
                "simulator": (f"http://127.0.0.1:{ports[name]}/v1/chat/completions", {}),
                "direct": (f"{base}/{name}-direct/vllm/v1/chat/completions", auth),
                "parsl": (f"{base}/{name}-parsl/vllm/v1/chat/completions", auth),
            }

        # The first requests wait for Parsl's workers to connect; then every worker gets to make its clients.
        for name in simulators:
            url, headers = paths(name)["parsl"]
            for stream in (False, True):
                for _ in range(600):
                    if httpx.post(url, json=chat(4, stream), headers=headers, timeout=60).status_code == 200:
                        break
                    time.sleep(0.1)
        most = max(args.concurrency)
        for name in simulators:
            for url, headers in paths(name).values():
                for stream in (False, True):
                    wrk(url, chat(16, stream), connections=most, seconds=2, headers=headers)

        assert gateway.process is not None

        def measured(name: str, url: str, body: dict[str, Any], connections: int, headers: dict[str, str]) -> Any:
            """One ``wrk`` run, with the CPU per request of the gateway, the request server and the simulator."""
            found = {
                "gateway": gateway.process.pid if gateway.process else None,
                "request_server": request_server(work, name),
                "simulator": simulators[name].process.pid if simulators[name].process else None,
            }
            pids = {process: pid for process, pid in found.items() if pid is not None}
            before = {process: cpu_seconds(pid) for process, pid in pids.items()}
            result = wrk(url, body, connections=connections, seconds=args.duration, headers=headers)
            for process in ("gateway", "request_server", "simulator"):
                used = cpu_seconds(pids[process]) - before[process] if process in pids else 0.0
                result[f"cpu_{process}"] = used / max(result["requests"], 1) * 1e6
            result["cpu_wrk"] = result["cpu"] / max(result["requests"], 1) * 1e6
            return result

        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start")
        url, _ = paths("instant")["simulator"]
        check = wrk(url, chat(16, False), connections=32, seconds=args.duration, headers={})
        print(
            f"load generator: wrk -t1 against the simulator with no delays, 32 connections: {check['rps']:.0f} req/s, "
            f"wrk used {check['cpu'] / check['seconds'] * 100:.0f}% of one core"
        )
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number} of {args.rounds}, {args.duration:g} s per figure")
            for tokens in args.tokens:
                for connections in args.concurrency:
                    for stream in (False, True):
                        rows = {
                            path: measured("model", url, chat(tokens, stream), connections, headers)
                            for path, (url, headers) in paths("model").items()
                        }
                        kind = "streamed" if stream else "whole"
                        print_table(
                            f"model-like timing, {tokens} tokens, {connections} concurrent, {kind}", rows, "simulator"
                        )
                        added = rows["parsl"]["p50"] - rows["simulator"]["p50"]
                        print(f"    parsl adds {added:.2f} ms at p50 over the simulator (target <= 10 ms)")
            for stream in (False, True):
                rows = {
                    path: measured("instant", url, chat(16, stream), 32, headers)
                    for path, (url, headers) in paths("instant").items()
                }
                kind = "streamed" if stream else "whole"
                print_table(f"no delays, 16 tokens, 32 concurrent, {kind}", rows, "direct")
    finally:
        if gateway is not None:
            gateway.stop()
        for simulator in simulators.values():
            simulator.stop()
    return 0


# Memory ----------------------------------------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rfind(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory_of(pid: int) -> tuple[str, int, int]:
    """A process's command line, and its resident and proportional set sizes in kB."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    sizes = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        sizes[name] = int(value.split()[0])
    return command, sizes["Rss"], sizes["Pss"]


def node_memory(gateway_pid: int, work: Path) -> dict[str, list[tuple[int, int]]]:
    """RSS and PSS (kB) of the gateway's processes: the gateway, the interchange, and the node's processes.

    On the node: Parsl's manager (``process_worker_pool.py``), the processes it spawns (its workers and one helper,
    a multiprocessing manager), and the request server.
    """
    groups: dict[str, list[tuple[int, int]]] = {
        "gateway": [],
        "interchange": [],
        "manager": [],
        "workers": [],
        "request server": [],
    }
    marker = str(work)
    for pid in [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]:
        try:
            command, rss, pss = memory_of(pid)
        except (OSError, KeyError):
            continue
        if pid == gateway_pid:
            groups["gateway"].append((rss, pss))
        elif "interchange" in command and pid in descendants(gateway_pid):
            groups["interchange"].append((rss, pss))
        elif marker in command and "serve_node" in command:
            groups["request server"].append((rss, pss))
        elif marker in command and "process_worker_pool" in command and not command.startswith(("/bin/", "bash")):
            groups["manager"].append((rss, pss))
            for child in descendants(pid)[1:]:
                try:
                    groups["workers"].append(memory_of(child)[1:])
                except (OSError, KeyError):
                    continue
    return groups


def memory(args: argparse.Namespace) -> int:
    import httpx

    in_flight = args.memory
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    token = os.urandom(16).hex()
    auth = {"authorization": f"Bearer {token}"}
    # Answers long enough that every request is still running when the memory is read.
    simulator = start_simulator(work, "model", (*MODEL_LIKE, "--max-num-seqs", str(in_flight)))
    gateway = None
    try:
        config = gateway_config({"model": simulator.port}, work, requests_per_node=in_flight)
        config["endpoints"] = config["endpoints"][1:]
        gateway = start_gateway(config, state(work), env={"INFERENCE_GATEWAY_DEV_TOKEN": token})
        url = f"http://127.0.0.1:{gateway.port}/resource_server/model-parsl/vllm/v1/chat/completions"
        for _ in range(600):
            if httpx.post(url, json=chat(4, False), headers=auth, timeout=60).status_code == 200:
                break
            time.sleep(0.1)
        # Every worker serves once, so each has made its clients.
        wrk(url, chat(16, False), connections=in_flight, seconds=4, headers=auth)
        wrk(url, chat(16, True), connections=in_flight, seconds=4, headers=auth)

        def report(label: str) -> None:
            groups = node_memory(gateway.process.pid, work)
            mib = 1024
            print(f"  {label}:")
            for name, sizes in groups.items():
                print(
                    f"    {name:15} {len(sizes):3d} processes  RSS {sum(r for r, _ in sizes) / mib:7.1f} MiB  "
                    f"PSS {sum(p for _, p in sizes) / mib:7.1f} MiB"
                )
            node = groups["manager"] + groups["workers"] + groups["request server"]
            print(
                f"    the node (manager, workers, request server): RSS {sum(r for r, _ in node) / mib:.0f} MiB, "
                f"PSS {sum(p for _, p in node) / mib:.0f} MiB"
            )

        workers = config["endpoints"][0]["parsl"].get("workers_per_node", 2)
        print(f"requests_per_node {in_flight}, workers_per_node {workers}")
        report("idle, after serving")
        lua = work / "long.lua"
        lua.write_text(wrk_script(chat(1500, True), {"authorization": auth["authorization"]}))
        load = subprocess.Popen(
            ["wrk", "-t1", f"-c{in_flight}", "-d12s", "--timeout", "30s", "-s", str(lua), url],
            stdout=subprocess.DEVNULL,
        )
        try:
            running = 0
            for _ in range(80):
                time.sleep(0.1)
                metrics = httpx.get(f"http://127.0.0.1:{simulator.port}/metrics").text
                running = int(
                    float(
                        next(
                            line.split()[-1]
                            for line in metrics.splitlines()
                            if line.startswith("vllm:num_requests_running")
                        )
                    )
                )
                if running >= in_flight:
                    break
            report(f"{running} requests in flight (streamed, the simulator's running count)")
        finally:
            load.kill()
            load.wait()
    finally:
        if gateway is not None:
            gateway.stop()
        simulator.stop()
    return 0


# Cold start ------------------------------------------------------------------------------------------------------


def cold_start(args: argparse.Namespace) -> int:
    """Seconds from starting ``inference-gateway serve`` on the embedded default to its first answer."""
    import httpx

    from compute_functions.model_server import free_port

    work = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    token = os.urandom(16).hex()
    port = free_port()
    env = {**os.environ, "INFERENCE_GATEWAY_STATE_DIR": str(work / "state"), "INFERENCE_GATEWAY_DEV_TOKEN": token}
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "inference-gateway"), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(work / "gateway.log").open("wb"),
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/resource_server/v1/chat/completions"
        while True:
            try:
                answer = httpx.post(url, json=chat(16, False), headers={"authorization": f"Bearer {token}"}, timeout=60)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - started > 120:
                print("no answer in 120 s")
                return 1
            time.sleep(0.05)
        print(f"cold start: first answer {time.perf_counter() - started:.2f} s after `inference-gateway serve` started")
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per figure")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 64], help="output tokens per answer")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--memory", type=int, metavar="N", help="measure memory with N requests per node in flight")
    parser.add_argument("--cold-start", action="store_true", help="measure the embedded default's first answer")
    args = parser.parse_args(argv)
    if args.cold_start:
        return cold_start(args)
    if shutil.which("wrk") is None:
        print("this benchmark needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    if args.memory:
        return memory(args)
    return throughput(args)


if __name__ == "__main__":
    sys.exit(main())
