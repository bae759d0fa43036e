"""The gateway's ``globus`` transport over the whole site, the way a scientist uses it.

Real processes throughout: ``inference-gateway serve`` with the real
``globus_compute_sdk.Executor``, the local Globus Compute service with RabbitMQ,
two ``globus-compute-endpoint`` daemons from the local template (clusters
``local-globus`` and ``second-globus``, both serving the model), their Parsl
workers running the registered compute functions, and the simulator those
functions start as the model server. Streamed answers come back through the
gateway's relay. Faults are real too: the broker closes the endpoint's AMQP
connections (``rabbitmqctl close_connection``: the two tests that do it fail at
once, saying what the account lacks, where it cannot control the broker), and the
endpoint's processes are killed.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import psutil
import pytest

from compute_functions.model_server import ModelServer
from gateway.simulator import command as simulator_command
from tests.compute_endpoint import ComputeSite, EndpointDaemon, credentials
from tests.globus_compute_service import BrokerControlUnavailable, ComputeService, broker_control, close_connections
from tests.support import MODEL, TOKEN, api_url, gateway, stop_model_servers

T = TypeVar("T")
QUESTION = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
HEADERS = {"authorization": f"Bearer {TOKEN}"}
# The task timeout of the first cluster: what a request waits for a result that will never come.
TASK_TIMEOUT = 30


def eventually(condition: Callable[[], Any], timeout: float = 60, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def once_started(request: Callable[[], T], timeout: float = 90) -> T:
    """``request``'s answer, asked again while the gateway says the model is being started (503)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request()
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc.message
            time.sleep(0.5)


@pytest.fixture
def rabbitmqctl() -> None:
    """The broker's control tool works from this account: nothing in AMQP closes another client's connection."""
    try:
        broker_control()
        missing = ""
    except BrokerControlUnavailable as exc:
        missing = str(exc)
    if missing:
        pytest.fail(missing, pytrace=False)


def inference_tasks_on(service: ComputeService, site: ComputeSite) -> int:
    """How many tasks of the ``inference`` function the service sent to ``site``'s endpoint."""
    users = service.endpoints[site.endpoint_id].user_endpoints
    function_id = site.function_ids["inference"]
    tasks = list(service.tasks.values())
    return sum(1 for task in tasks if task.endpoint_id in users and task.function_id == function_id)


def channels_connected(site: ComputeSite) -> int:
    """How many times the node's request servers of ``site`` said that their node channel connected."""
    logs = site.state_dir.glob("requests-*.log")
    return sum(log.read_text(errors="replace").count(": connected") for log in logs)


def amqp_ports(daemon: EndpointDaemon) -> set[int]:
    """The local ports of the endpoint's connections to the broker."""
    ports = set()
    for process in daemon.processes():
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        ports.update(c.laddr.port for c in connections if c.raddr and c.raddr.port == 5672)
    return ports


def all_connected(site: ComputeSite) -> None:
    """Wait until the endpoint has its connections to the broker back (after an earlier test closed them).

    An answer is no sign of them: it comes through the relay, not through the endpoint's result connection.
    """
    assert eventually(lambda: len(amqp_ports(site.daemon)) >= 4, timeout=60), amqp_ports(site.daemon)


@pytest.fixture(scope="module")
def second_site(compute_service: ComputeService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeSite]:
    """A second cluster with its own endpoint daemon, serving the same model."""
    folder = tmp_path_factory.mktemp("second-site")
    daemon = EndpointDaemon("second-inference", folder, compute_service.env())
    command = simulator_command(MODEL, options=("--tpot", "0.002"))
    try:
        yield ComputeSite(daemon, "second-globus", MODEL, command, folder / "node").set_up()
    finally:
        daemon.stop()
        if (folder / "node").exists():
            stop_model_servers(folder / "node")


@pytest.fixture(scope="module")
def batch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture(scope="module")
def front(
    compute_site: ComputeSite,
    second_site: ComputeSite,
    compute_service: ComputeService,
    batch_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ModelServer]:
    # A user endpoint's first task waits some 15-20 s for its workers, beyond the task timeout set below.
    for site in (compute_site, second_site):
        site.warm_up()
    first = compute_site.endpoint()
    first["globus"] = {**first["globus"], "task_timeout": TASK_TIMEOUT}  # type: ignore[dict-item]
    config = {
        "server": {"request_timeout": 60},
        "auth": {"providers": ["dev"]},
        "federation": {"status_interval": 1, "stale_after": 20},
        "endpoints": [first, second_site.endpoint()],
        "batches": {"allowed_roots": [str(batch_root)], "slice_seconds": 2, "poll_interval": 0.2},
    }
    env = {**compute_service.env(), **credentials()}
    with gateway(config, tmp_path_factory.mktemp("globus-front"), env=env, log_level="info") as server:
        yield server


def request_servers(site: ComputeSite) -> list[psutil.Process]:
    """The node's request servers of ``site``: they run in sessions of their own, beside the endpoint's workers."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(process.cmdline())
            if "serve_node" in cmdline and str(site.state_dir) in cmdline:
                found.append(process)
    return found


def state_of(front: ModelServer, cluster: str) -> str:
    listed = httpx.get(f"http://{front.host}:{front.port}/resource_server/list-endpoints", headers=HEADERS, timeout=10)
    (view,) = [view for view in listed.json()["data"] if view["cluster"] == cluster]
    return str(view["state"])


def cluster_client(front: ModelServer, cluster: str = "local-globus") -> openai.OpenAI:
    base_url = f"http://{front.host}:{front.port}/resource_server/{cluster}/vllm/v1"
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0, timeout=90)


def test_a_cold_model_is_being_started_then_answers(front: ModelServer) -> None:
    # The user endpoint runs, its node has no model server yet: the status function reports the model cold.
    assert eventually(lambda: state_of(front, "local-globus") == "cold", timeout=30), state_of(front, "local-globus")
    client = cluster_client(front)

    with pytest.raises(openai.APIStatusError) as cold:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)  # type: ignore[arg-type]

    assert cold.value.status_code == 503 and "being started" in cold.value.message
    assert cold.value.response.headers.get("retry-after")
    once_started(lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1))  # type: ignore[arg-type]
    assert eventually(lambda: state_of(front, "local-globus") == "hot", timeout=30)


def test_chat_whole_and_streamed(front: ModelServer) -> None:
    client = cluster_client(front)
    whole = once_started(lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8))  # type: ignore[arg-type]
    assert whole.model == MODEL and whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens == 8

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) == 12
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_completions_whole_and_streamed_and_embeddings(front: ModelServer) -> None:
    client = cluster_client(front)
    whole = once_started(lambda: client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=6))
    assert whole.choices[0].text and whole.usage is not None and whole.usage.completion_tokens == 6

    streamed = list(client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=6, stream=True))
    assert len([chunk for chunk in streamed if chunk.choices and chunk.choices[0].text]) == 6

    embeddings = client.embeddings.create(model=MODEL, input=["first text", "second text"])
    assert len(embeddings.data) == 2 and embeddings.data[0].embedding


def test_once_the_node_channel_is_connected_requests_take_no_task(
    front: ModelServer, compute_site: ComputeSite, compute_service: ComputeService
) -> None:
    client = cluster_client(front)
    once_started(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    # The task that handed the first request over carried the invitation: the request server dialled in.
    assert eventually(lambda: channels_connected(compute_site), timeout=30)
    before = inference_tasks_on(compute_service, compute_site)
    with ThreadPoolExecutor(8) as pool:
        whole = list(pool.map(lambda _: client.completions.create(model=MODEL, prompt="hi", max_tokens=3), range(16)))
        streamed = list(
            pool.map(
                lambda _: list(client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True)),
                range(16),
            )
        )
    assert all(answer.usage is not None and answer.usage.completion_tokens == 3 for answer in whole)
    assert all("".join(chunk.choices[0].text for chunk in chunks if chunk.choices) for chunks in streamed)
    assert inference_tasks_on(compute_service, compute_site) == before
    # The federation counts the connected node as serving.
    assert state_of(front, "local-globus") == "hot"


def test_responses_messages_and_tokenizer_go_through_globus_compute(front: ModelServer) -> None:
    client = cluster_client(front)
    once_started(lambda: client.responses.create(model=MODEL, input="Boiling point of water?", max_output_tokens=2))
    with client.responses.stream(model=MODEL, input="Boiling point of water?", max_output_tokens=6) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(deltas) and final.usage is not None and final.usage.output_tokens == 6

    claude = anthropic.Anthropic(
        base_url=f"http://{front.host}:{front.port}/resource_server/local-globus/vllm", api_key=TOKEN, max_retries=0
    )
    with claude.messages.stream(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}]) as events:
        assert len("".join(events.text_stream).split()) == 4
    counted: Any = client.post("/tokenize", body={"model": MODEL, "prompt": "water boils"}, cast_to=object)
    assert counted["count"] == 2


def test_jobs_and_status_show_the_cluster_serving(front: ModelServer) -> None:
    once_started(lambda: cluster_client(front).completions.create(model=MODEL, prompt="hi", max_tokens=1))
    base = f"http://{front.host}:{front.port}/resource_server"

    def running() -> list[dict[str, Any]]:
        jobs = httpx.get(f"{base}/local-globus/jobs", headers=HEADERS, timeout=10).json()
        return [job for job in jobs["running"] if job["model"] == MODEL]

    assert eventually(running, timeout=20), httpx.get(f"{base}/list-endpoints", headers=HEADERS).text
    status = httpx.get(f"{base}/status", headers=HEADERS, timeout=10).json()
    assert "local-globus" in json.dumps(status) and "up" in json.dumps(status)


def test_a_batch_runs_through_globus(front: ModelServer, batch_root: Path) -> None:
    once_started(lambda: cluster_client(front).completions.create(model=MODEL, prompt="hi", max_tokens=1))
    source = batch_root / "input.jsonl"
    source.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{n}"}], "max_tokens": 4}) + "\n" for n in range(5)
        )
    )
    url = f"http://{front.host}:{front.port}/resource_server/local-globus/vllm/v1/batches"
    created = httpx.post(
        url,
        headers=HEADERS,
        json={"input_file_path": str(source), "output_folder_path": str(batch_root / "out"), "model": MODEL},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]

    def finished() -> dict[str, Any] | None:
        batch = httpx.get(f"{url}/{batch_id}", headers=HEADERS, timeout=10).json()
        return batch if batch["status"] in ("completed", "failed", "expired", "cancelled") else None

    batch = eventually(finished, timeout=90)
    assert batch and batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    results = (batch_root / "out" / batch_id / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["line"] for line in results) == [1, 2, 3, 4, 5]


def test_requests_succeed_after_the_broker_closes_the_idle_endpoints_connections(
    rabbitmqctl: None, front: ModelServer, compute_site: ComputeSite, compute_service: ComputeService
) -> None:
    client = cluster_client(front)
    once_started(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    all_connected(compute_site)

    closed = close_connections(compute_service.vhost, amqp_ports(compute_site.daemon))

    assert closed >= 4  # the daemon's commands and heartbeats, the user endpoint's tasks, results and heartbeats
    started = time.monotonic()
    for _ in range(3):
        answer = client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert time.monotonic() - started < 60


def test_requests_in_flight_when_the_broker_closes_the_connections_end_and_later_ones_succeed(
    rabbitmqctl: None, front: ModelServer, compute_site: ComputeSite, compute_service: ComputeService
) -> None:
    client = cluster_client(front)
    once_started(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    all_connected(compute_site)

    def ask(_: int) -> str:
        try:
            answer = client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=500)
            return "ok" if answer.usage and answer.usage.completion_tokens == 500 else "short"
        except openai.APIStatusError as exc:
            return str(exc.status_code)

    with ThreadPoolExecutor(8) as pool:
        asked = [pool.submit(ask, n) for n in range(8)]
        time.sleep(0.3)
        assert close_connections(compute_service.vhost, amqp_ports(compute_site.daemon)) >= 4
        # Nothing hangs: every request in flight ends within its task timeout.
        outcomes = [future.result(timeout=TASK_TIMEOUT + 30) for future in asked]
    print(f"requests in flight when the broker closed the endpoint's connections: {sorted(outcomes)}")
    assert set(outcomes) <= {"ok", "504", "503"}, outcomes
    for _ in range(3):
        answer = client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens == 4


def test_a_node_lost_mid_request_is_a_502_and_the_other_cluster_takes_the_next_requests(
    front: ModelServer, compute_site: ComputeSite, second_site: ComputeSite, compute_service: ComputeService
) -> None:
    client = cluster_client(front)
    once_started(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    federated = openai.OpenAI(base_url=api_url(front), api_key=TOKEN, max_retries=0, timeout=90)
    # The second cluster's model server is started before the fault, so that it is hot when needed.
    once_started(
        lambda: cluster_client(front, "second-globus").completions.create(model=MODEL, prompt="hi", max_tokens=1)
    )

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            lambda: client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=2000)
        )
        time.sleep(1.0)
        # The whole endpoint goes, as when its host dies: the daemon, its user endpoint, the workers and the
        # node's request server, which holds the request.
        for process in [*compute_site.daemon.processes(), *request_servers(compute_site)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with pytest.raises(openai.APIStatusError) as lost:
            in_flight.result(timeout=TASK_TIMEOUT + 30)
    # The documented answer when the node's answer breaks off: its relay request ended without the outcome.
    assert lost.value.status_code == 502 and "worker" in lost.value.message

    # Once its heartbeats stop, the service reports it offline and the gateway sends requests elsewhere.
    assert eventually(lambda: not compute_service.online(compute_site.endpoint_id), timeout=30)
    # A request for that cluster by name is refused at once rather than queued for an endpoint that is gone.
    assert eventually(lambda: state_of(front, "local-globus") == "offline", timeout=30)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert refused.value.status_code == 503 and time.monotonic() - started < 5

    # The first cluster is offline and everything of it killed: the second, the model's only other cluster, answers
    # (by a task, or down its node's channel).
    for _ in range(3):
        answer = federated.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4, timeout=30)
        assert answer.usage is not None and answer.usage.completion_tokens == 4

    # The killed daemon's PID file is recent, and the daemon refuses to start beside what may be a live one until
    # it is stale; an operator who knows the host died removes it, as the daemon's message says.
    (compute_site.daemon.endpoint_dir / "daemon.pid").unlink(missing_ok=True)
    compute_site.daemon.start()


@pytest.mark.timeout(600)
def test_a_request_server_killed_mid_answer_is_a_502_and_the_next_requests_succeed(
    front: ModelServer, compute_site: ComputeSite
) -> None:
    # A restarted endpoint's user endpoint and workers take longer to start than the cluster's task timeout.
    compute_site.warm_up()
    client = cluster_client(front)
    once_started(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    # Until the node's channel connects, the service's report of the just-restarted endpoint may lag (no worker
    # counts before its first heartbeat), and a request may still be told that the model is being started.
    assert eventually(lambda: channels_connected(compute_site) and state_of(front, "local-globus") == "hot", timeout=60)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            lambda: client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=2000)
        )
        assert eventually(lambda: request_servers(compute_site), timeout=30)
        time.sleep(0.5)
        for process in request_servers(compute_site):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with pytest.raises(openai.APIStatusError) as lost:
            in_flight.result(timeout=TASK_TIMEOUT + 30)
    assert lost.value.status_code == 502 and "worker" in lost.value.message
    # The next hand-over, by a task since no channel is connected, starts a new request server (its log starts
    # afresh), which dials in.
    for _ in range(3):
        answer = client.completions.create(model=MODEL, prompt="Water boils at", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert request_servers(compute_site)
    assert eventually(lambda: channels_connected(compute_site), timeout=30)
