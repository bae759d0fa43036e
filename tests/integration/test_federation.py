"""Routing one model across clusters by what the gateway last saw of each."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from compute_functions.model_server import ModelServer, free_port
from tests.support import REPO, TOKEN, api_url, direct_config, endpoint, gateway, metric, scrape, simulator

MODEL = "facebook/opt-125m"
MESSAGES = [{"role": "user", "content": "Where should this run?"}]
FAST_STATUS = {"status_interval": 0.3, "status_jitter": 0.1, "stale_after": 5, "status_timeout": 2}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


class Front:
    def __init__(self, server: ModelServer, state_dir: Path) -> None:
        self.server = server
        self.state_dir = state_dir
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{server.port}", timeout=30, headers={"authorization": f"Bearer {TOKEN}"}
        )

    def chat(self, path: str = "/resource_server/v1", model: str = MODEL, **extra: Any) -> httpx.Response:
        return self.http.post(
            f"{path}/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 4, **extra}
        )

    def states(self) -> dict[str, str]:
        listed = self.http.get("/resource_server/list-endpoints").json()["data"]
        return {entry["cluster"]: entry["state"] for entry in listed}


def served(sim: ModelServer) -> float:
    return metric(scrape(f"http://127.0.0.1:{sim.port}/metrics"), "vllm:request_success_total")


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, ModelServer]]:
    with simulator("--tpot", "0.001") as fast, simulator("--tpot", "0.002") as slow, simulator() as closed:
        yield {"fast": fast, "slow": slow, "closed": closed}


@pytest.fixture(scope="module")
def front(clusters: dict[str, ModelServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("federation")
    config = direct_config(
        endpoint(clusters["fast"].base_url, [MODEL, "cold-model"], cluster="fast"),
        endpoint(clusters["slow"].base_url, cluster="slow"),
        endpoint(f"http://127.0.0.1:{free_port()}/v1", cluster="dark"),
        endpoint(clusters["closed"].base_url, cluster="closed"),
    )
    config["federation"] = {**FAST_STATUS, "maintenance": {"closed": "filesystem upgrade until 14:00"}}
    with gateway(config, tmp) as server:
        front = Front(server, tmp / "state")
        wait_for(lambda: front.states() == {"fast": "hot", "slow": "hot", "dark": "offline", "closed": "maintenance"})
        yield front


def test_list_endpoints_reports_each_state_with_load_and_detail(front: Front) -> None:
    listed = {entry["cluster"]: entry for entry in front.http.get("/resource_server/list-endpoints").json()["data"]}
    assert listed["dark"]["state"] == "offline" and "cannot connect" in listed["dark"]["detail"]
    assert listed["closed"]["detail"] == "filesystem upgrade until 14:00"
    assert listed["fast"]["load"] == {"running": 0, "waiting": 0, "gateway_in_flight": 0}
    assert listed["fast"]["breaker"] == "closed" and listed["fast"]["observed_at"].endswith("Z")


def test_federated_requests_go_only_to_serving_clusters(front: Front, clusters: dict[str, ModelServer]) -> None:
    before = {name: served(sim) for name, sim in clusters.items()}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: front.chat().status_code, range(80)))
    assert statuses == [200] * 80
    gained = {name: served(sim) - before[name] for name, sim in clusters.items()}
    assert gained["closed"] == 0
    assert gained["fast"] + gained["slow"] == 80, gained
    # Both serving clusters take requests. How many each takes follows their measured speed and the machine's
    # timing (the faster took 54-58 of the 80 alone, 70 during a full test run), so no share is asked of either.
    assert gained["fast"] > 0 and gained["slow"] > 0, gained


def test_cluster_route_names_maintenance(front: Front) -> None:
    response = front.chat("/resource_server/closed/vllm/v1")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "cluster_under_maintenance" and "filesystem upgrade" in error["message"]
    assert response.headers["retry-after"]


def test_cluster_route_to_an_offline_cluster_still_tries_it_and_says_503(front: Front) -> None:
    response = front.chat("/resource_server/dark/vllm/v1")
    assert response.status_code == 503 and response.json()["error"]["code"] == "backend_unavailable"


def test_a_model_that_is_not_running_gets_503_naming_its_state(front: Front) -> None:
    response = front.chat(model="cold-model")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "model_cold"
    assert "not running on cluster 'fast'" in error["message"] and response.headers["retry-after"] == "30"


def test_cluster_models_jobs_and_status_routes(front: Front) -> None:
    models = front.http.get("/resource_server/fast/models").json()["data"]
    assert {(entry["id"], entry["state"]) for entry in models} == {(MODEL, "hot"), ("cold-model", "cold")}
    jobs = front.http.get("/resource_server/slow/jobs").json()
    assert jobs["cluster"] == "slow" and [job["model"] for job in jobs["running"]] == [MODEL]
    assert jobs["queued"] == [] and jobs["starting"] == []
    clusters = front.http.get("/resource_server/status").json()["clusters"]
    assert {name: entry["status"] for name, entry in clusters.items()} == {
        "fast": "up",
        "slow": "up",
        "dark": "down",
        "closed": "maintenance",
    }
    assert front.http.get("/resource_server/nowhere/jobs").status_code == 404


def _maintenance(front: Front, *args: str) -> str:
    env = {**os.environ, "INFERENCE_GATEWAY_STATE_DIR": str(front.state_dir)}
    config = next(front.state_dir.parent.glob("gateway-*.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "maintenance", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    )
    return result.stdout


def test_maintenance_command_takes_a_cluster_out_and_back(front: Front) -> None:
    assert "slow: maintenance: rack move" in _maintenance(front, "slow", "--message", "rack move")
    wait_for(lambda: front.states()["slow"] == "maintenance")
    assert front.chat("/resource_server/slow/vllm/v1").json()["error"]["code"] == "cluster_under_maintenance"
    assert front.chat().status_code == 200
    assert "slow: in service" in _maintenance(front, "slow", "--off")
    wait_for(lambda: front.states()["slow"] == "hot")
    assert front.chat("/resource_server/slow/vllm/v1").status_code == 200


def test_cluster_killed_during_load_and_brought_back(tmp_path: Path, clusters: dict[str, ModelServer]) -> None:
    with simulator("--tpot", "0.002", port=free_port()) as doomed:
        config = direct_config(
            endpoint(doomed.base_url, cluster="doomed"), endpoint(clusters["fast"].base_url, cluster="steady")
        )
        config["federation"] = FAST_STATUS
        _kill_and_bring_back(doomed, config, tmp_path)


def _kill_and_bring_back(doomed: ModelServer, config: dict[str, Any], tmp_path: Path) -> None:
    with gateway(config, tmp_path) as server:
        front = Front(server, tmp_path / "state")
        wait_for(lambda: front.states() == {"doomed": "hot", "steady": "hot"})
        results: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=30, headers={"authorization": f"Bearer {TOKEN}"}) as client:
                while not stop.is_set():
                    results.append(
                        client.post(
                            f"{api_url(server)}/chat/completions",
                            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8},
                        ).status_code
                    )

        workers = [threading.Thread(target=load) for _ in range(6)]
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        doomed.stop(grace=0)
        time.sleep(1.5)
        assert front.states()["doomed"] == "offline"
        doomed.start(timeout=30)  # the same command on the same port
        wait_for(lambda: front.states()["doomed"] == "hot")
        before = served(doomed)
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.join()
        assert results and set(results) == {200}, {code: results.count(code) for code in set(results)}
        assert served(doomed) > before


def test_one_long_request_does_not_starve_its_endpoint(tmp_path: Path) -> None:
    # Two equal endpoints; one answers a request for 2,000 tokens, then 400 short requests come in sequence.
    with simulator("--tpot", "0.001") as first, simulator("--tpot", "0.001") as second:
        config = direct_config(
            endpoint(first.base_url, [MODEL], cluster="first"), endpoint(second.base_url, [MODEL], cluster="second")
        )
        with gateway(config, tmp_path) as server:
            front = Front(server, tmp_path)
            long = front.chat("/resource_server/first/vllm/v1", max_tokens=2000)
            assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 2000
            before = served(first)
            for _ in range(400):
                assert front.chat(max_tokens=16).status_code == 200
            share = served(first) - before
            assert 100 < share < 300, share
