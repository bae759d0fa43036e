"""How many requests a node of the ``parsl`` transport serves at once is ``requests_per_node``, not its cores.

The simulator counts the requests it runs (``vllm:num_requests_running`` per model), so the tests watch that count
while streams are under way, on whatever machine runs them (two cores here), with two worker processes per node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from compute_functions.model_server import ModelServer, free_port
from gateway.simulator import command as simulator_command
from tests.support import TOKEN, api_url, gateway, scrape

WIDE = "facebook/opt-125m"
NARROW = "meta-llama/Meta-Llama-3-8B-Instruct"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelServer, int]]:
    tmp = tmp_path_factory.mktemp("concurrency")
    port = free_port()
    launch = {
        "command": simulator_command(WIDE, NARROW, options=("--tpot", "0.01")),
        "port": port,
        "state_dir": str(tmp / "servers"),
        "startup_timeout": 30,
    }

    def endpoint(cluster: str, model: str, parsl: dict[str, Any]) -> dict[str, Any]:
        base = {"provider": "local", "init_blocks": 1, "min_blocks": 1, "max_blocks": 1}
        return {
            "cluster": cluster,
            "framework": "vllm",
            "models": [model],
            "transport": "parsl",
            "worker_model_server": launch,
            "parsl": {**base, **parsl},
        }

    config = {
        "auth": {"providers": ["dev"]},
        "federation": {"when_not_hot": "hold"},
        "endpoints": [
            endpoint("wide", WIDE, {"requests_per_node": 64, "workers_per_node": 2}),
            # The name Parsl uses still reads as the requests a node serves at once.
            endpoint("narrow", NARROW, {"max_workers_per_node": 4}),
        ],
    }
    with gateway(config, tmp) as server:
        yield server, port


def running(port: int, model: str) -> int:
    try:
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return 0  # the first request is starting the simulator
    for line in metrics.splitlines():
        if line.startswith("vllm:num_requests_running{") and f'model_name="{model}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def streams(server: ModelServer, cluster: str, model: str, count: int, tokens: int) -> list[threading.Thread]:
    """``count`` streamed chat requests started at once; each thread records its status in ``thread.status``."""
    url = f"{api_url(server).replace('/v1', '')}/{cluster}/vllm/v1/chat/completions"
    body = {"model": model, "messages": QUESTION, "max_tokens": tokens, "ignore_eos": True, "stream": True}

    def ask(thread: Any) -> None:
        with httpx.stream("POST", url, json=body, headers={"authorization": f"Bearer {TOKEN}"}, timeout=120) as answer:
            text = answer.read().decode()
        thread.status = (answer.status_code, text.rstrip().endswith("data: [DONE]") and '"error"' not in text)

    threads = []
    for _ in range(count):
        thread = threading.Thread(target=lambda: ask(threading.current_thread()))
        thread.start()
        threads.append(thread)
    return threads


def peak_while(threads: list[threading.Thread], port: int, model: str) -> int:
    peak = 0
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, running(port, model))
        time.sleep(0.05)
    return peak


def test_a_node_serves_as_many_requests_at_once_as_requests_per_node(front: tuple[ModelServer, int]) -> None:
    server, port = front
    # Two worker processes and two cores: 32 streams still run at once in the model server.
    threads = streams(server, "wide", WIDE, 32, 600)
    assert peak_while(threads, port, WIDE) == 32
    assert [thread.status for thread in threads] == [(200, True)] * 32  # type: ignore[attr-defined]


def test_requests_beyond_requests_per_node_wait_their_turn(front: tuple[ModelServer, int]) -> None:
    server, port = front
    threads = streams(server, "narrow", NARROW, 10, 100)
    assert peak_while(threads, port, NARROW) == 4
    assert [thread.status for thread in threads] == [(200, True)] * 10  # type: ignore[attr-defined]
