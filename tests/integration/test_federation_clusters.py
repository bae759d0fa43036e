"""Three clusters of different states and speeds, one of them behind Parsl, serving one model."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from compute_functions.model_server import ModelServer, free_port
from gateway.simulator import command as simulator_command
from tests.integration.test_federation import MODEL, Front, served, wait_for
from tests.support import direct_config, endpoint, gateway, metric, scrape, simulator

PARSL = {"provider": "local", "max_workers_per_node": 4, "init_blocks": 1, "min_blocks": 1, "max_blocks": 1}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Front, dict[str, ModelServer], int]]:
    tmp = tmp_path_factory.mktemp("three-clusters")
    hpc_port = free_port()
    launch = simulator_command(MODEL, options=("--tpot", "0.002"))
    with simulator("--tpot", "0.001") as fast, simulator("--tpot", "0.004") as slow:
        config = direct_config(endpoint(fast.base_url, cluster="fast"), endpoint(slow.base_url, cluster="slow"))
        config["endpoints"].append({
            "cluster": "hpc", "framework": "vllm", "models": [MODEL], "transport": "parsl", "parsl": PARSL,
            "worker_model_server": {"command": launch, "port": hpc_port, "state_dir": str(tmp / "servers"),
                                    "startup_timeout": 30},
        })  # fmt: skip
        config["federation"] = {"status_interval": 0.5, "status_jitter": 0.1, "stale_after": 5}
        config["server"]["request_timeout"] = 60
        with gateway(config, tmp) as server:
            yield Front(server, tmp / "state"), {"fast": fast, "slow": slow}, hpc_port


def test_not_hot_cluster_is_passed_over_then_started_then_used(
    clusters: tuple[Front, dict[str, ModelServer], int],
) -> None:
    front, sims, hpc_port = clusters
    wait_for(lambda: front.states()["fast"] == "hot" and front.states()["slow"] == "hot")
    assert front.states()["hpc"] in {"starting", "cold"}

    # Nothing runs on hpc yet: the federated route uses the hot clusters only.
    before = {name: served(sim) for name, sim in sims.items()}
    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(lambda _: front.chat().status_code, range(30))) == {200}
    assert sum(served(sim) - before[name] for name, sim in sims.items()) == 30

    # Asked by name, hpc says what state it is in and starts the model.
    wait_for(lambda: front.states()["hpc"] == "cold", timeout=60)
    refused = front.chat("/resource_server/hpc/vllm/v1")
    assert refused.status_code == 503 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "model_cold" and "cluster 'hpc'" in error["message"]

    # The warm-up launched the simulator through the compute function; hpc turns hot and takes its share.
    wait_for(lambda: front.states()["hpc"] == "hot", timeout=60)
    hpc_metrics = f"http://127.0.0.1:{hpc_port}/metrics"
    hpc_before = metric(scrape(hpc_metrics), "vllm:request_success_total")
    before = {name: served(sim) for name, sim in sims.items()}
    with ThreadPoolExecutor(12) as pool:
        assert set(pool.map(lambda _: front.chat(max_tokens=16).status_code, range(240))) == {200}
    gained = {name: served(sim) - before[name] for name, sim in sims.items()}
    gained["hpc"] = metric(scrape(hpc_metrics), "vllm:request_success_total") - hpc_before
    assert all(count > 0 for count in gained.values()), gained
    assert gained["slow"] < gained["fast"], gained
    assert front.chat("/resource_server/hpc/vllm/v1").status_code == 200


def test_jobs_route_shows_the_parsl_cluster(clusters: tuple[Front, dict[str, ModelServer], int]) -> None:
    front, _, _ = clusters
    jobs = front.http.get("/resource_server/hpc/jobs").json()
    assert jobs["cluster"] == "hpc" and set(jobs) == {"cluster", "running", "starting", "queued"}
    assert isinstance(httpx.get(f"{front.http.base_url}/resource_server/health").json(), dict)
