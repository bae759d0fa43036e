"""The ``globus`` transport: the real compute functions through the real SDK, and faults through an executor double.

The answers and status reports come from the local site for real (the SDK's
``Executor``, the local Globus Compute service with RabbitMQ, the endpoint daemon
from the local template and its workers: ``site_dispatcher``). The executor
double of ``tests.globus_doubles`` stays only where a test needs a fault on
demand that the real stack does not give at a chosen moment: a worker lost on
the node, the service refusing a submission, a login that fails, every worker
busy, a result that arrives after the gateway gave up; and to count executors.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from globus_compute_sdk.errors import TaskExecutionFailed

from gateway.config import EndpointSettings
from gateway.dispatch.base import BackendError, BackendProtocolError, BackendTimeout, BackendUnavailable
from gateway.dispatch.compute import served_availability
from gateway.dispatch.globus import GlobusDispatcher, availability_of
from gateway.federation.registry import Endpoint
from gateway.streaming.relay import LocalRelay
from tests.compute_endpoint import ComputeSite
from tests.globus_compute_service import ComputeService as LocalComputeService
from tests.globus_doubles import (
    FUNCTION_IDS,
    GLOBUS_ENDPOINT,
    ComputeService,
    ExecutorFactory,
    simulator_launch,
)
from tests.support import MODEL, stop_model_servers

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is machine learning?"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the workers' model servers keep their files; every server started there is stopped at the end."""
    directory = tmp_path_factory.mktemp("node")
    yield directory
    stop_model_servers(directory)


def globus_endpoint(worker_model_server: dict[str, Any], framework: str = "vllm", **globus: Any) -> Endpoint:
    settings = EndpointSettings.model_validate(
        {
            "cluster": "polaris",
            "framework": framework,
            "models": [MODEL],
            "transport": "globus",
            "globus": {"endpoint_id": GLOBUS_ENDPOINT, "function_ids": FUNCTION_IDS, **globus},
            "worker_model_server": worker_model_server,
        }
    )
    return Endpoint.from_settings(settings, "")


def make_dispatcher(
    service: ComputeService | Callable[[], ComputeService], executors: ExecutorFactory, request_timeout: float = 30.0
) -> GlobusDispatcher:
    return GlobusDispatcher(
        relay=LocalRelay(secrets.token_bytes(32)),
        relay_url=None,
        request_timeout=request_timeout,
        client_factory=service if callable(service) else lambda: service,
        executor_factory=executors,
    )


@pytest.fixture
def service() -> ComputeService:
    return ComputeService()


@pytest.fixture
def executors() -> ExecutorFactory:
    return ExecutorFactory()


@pytest.fixture
async def dispatcher(service: ComputeService, executors: ExecutorFactory) -> AsyncIterator[GlobusDispatcher]:
    dispatcher = make_dispatcher(service, executors)
    await dispatcher.start()
    yield dispatcher
    await dispatcher.close()


@pytest.fixture
def endpoint(node_dir: Path) -> Endpoint:
    return globus_endpoint(simulator_launch(node_dir))


@pytest.fixture
async def site_dispatcher(compute_env: dict[str, str]) -> AsyncIterator[GlobusDispatcher]:
    """The dispatcher with its default SDK client and executors, logged in to the local service."""
    dispatcher = GlobusDispatcher(relay=LocalRelay(secrets.token_bytes(32)), relay_url=None, request_timeout=30.0)
    await dispatcher.start()
    yield dispatcher
    await dispatcher.close()


def site_endpoint(site: ComputeSite, worker_model_server: dict[str, Any]) -> Endpoint:
    return globus_endpoint(worker_model_server, endpoint_id=site.endpoint_id, function_ids=site.function_ids)


async def test_chat_completion_runs_the_registered_inference_function(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, compute_service: LocalComputeService, node_dir: Path
) -> None:
    endpoint = site_endpoint(compute_site, simulator_launch(node_dir))
    before = set(compute_service.tasks)

    answer = await site_dispatcher.call(endpoint, "chat/completions", CHAT)

    assert answer["object"] == "chat.completion" and answer["model"] == MODEL
    assert answer["choices"][0]["message"]["content"]
    (task,) = [task for task_id, task in compute_service.tasks.items() if task_id not in before]
    assert task.function_id == compute_site.function_ids["inference"]


async def test_one_executor_per_globus_endpoint_made_on_first_use(
    dispatcher: GlobusDispatcher, executors: ExecutorFactory, node_dir: Path
) -> None:
    first = globus_endpoint(simulator_launch(node_dir), framework="vllm")
    second = globus_endpoint(simulator_launch(node_dir), framework="vllm-other")
    assert executors.made == []

    await asyncio.gather(
        *(
            dispatcher.call(endpoint, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
            for endpoint in (first, second, first, second)
        )
    )

    assert len(executors.made) == 1 and len(executors.made[0].submitted) == 4


async def test_embeddings_and_completions_come_back_whole(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, node_dir: Path
) -> None:
    endpoint = site_endpoint(compute_site, simulator_launch(node_dir))
    completion = await site_dispatcher.call(
        endpoint, "completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
    )
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 3

    embedding = await site_dispatcher.call(endpoint, "embeddings", {"model": MODEL, "input": ["one", "two"]})
    assert [item["index"] for item in embedding["data"]] == [0, 1]


async def test_model_server_error_is_the_backends_error(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, node_dir: Path
) -> None:
    endpoint = site_endpoint(compute_site, simulator_launch(node_dir))
    with pytest.raises(BackendError) as raised:
        await site_dispatcher.call(endpoint, "chat/completions", {**CHAT, "model": "no-such-model"})

    assert raised.value.status == 404
    assert b"no-such-model" in raised.value.body


async def test_model_server_that_cannot_start_is_unavailable(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, node_dir: Path
) -> None:
    broken = site_endpoint(
        compute_site,
        {
            "command": ["{python}", "-c", "raise SystemExit('no GPU here')"],
            "startup_timeout": 20,
            "state_dir": str(node_dir),
        },
    )

    with pytest.raises(BackendUnavailable, match="model_start_failed"):
        await site_dispatcher.call(broken, "chat/completions", CHAT)


async def test_compute_function_raising_on_the_worker_is_a_protocol_error(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, node_dir: Path
) -> None:
    endpoint = site_endpoint(compute_site, simulator_launch(node_dir))
    with pytest.raises(BackendProtocolError, match="unknown operation"):
        await site_dispatcher.call(endpoint, "images/generations", {"model": MODEL})


async def test_lost_worker_is_unavailable_so_failover_may_try_elsewhere(
    dispatcher: GlobusDispatcher, executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    await dispatcher.call(endpoint, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})

    def lost(request: dict[str, Any]) -> dict[str, Any]:
        raise TaskExecutionFailed(
            "Traceback (most recent call last):\n"
            "parsl.executors.high_throughput.errors.WorkerLost: Task failure due to loss of worker 3 on host x3004"
        )

    executors.made[0].functions[FUNCTION_IDS["inference"]] = lost
    with pytest.raises(BackendUnavailable, match="worker lost"):
        await dispatcher.call(endpoint, "chat/completions", CHAT)


async def test_refused_submission_is_unavailable_and_the_next_request_gets_a_new_executor(
    dispatcher: GlobusDispatcher, executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    await dispatcher.call(endpoint, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    executors.made[0].fail_submissions = ConnectionError("compute.api.globus.org unreachable")

    with pytest.raises(BackendUnavailable, match="unreachable"):
        await dispatcher.call(endpoint, "chat/completions", CHAT)

    answer = await dispatcher.call(endpoint, "chat/completions", CHAT)
    assert answer["choices"]
    assert len(executors.made) == 2 and executors.made[0].stopped and not executors.made[1].stopped


async def test_offline_endpoint_is_refused_without_submitting(
    dispatcher: GlobusDispatcher, service: ComputeService, executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    service.status = {"status": "offline"}
    endpoint.observe(await dispatcher.status(endpoint))

    with pytest.raises(BackendUnavailable, match="offline"):
        await dispatcher.call(endpoint, "chat/completions", CHAT)
    assert all(not executor.submitted for executor in executors.made)

    service.status = {"status": "online", "details": {"total_workers": 1, "idle_workers": 1}}
    endpoint.observe(await dispatcher.status(endpoint))
    assert (await dispatcher.call(endpoint, "chat/completions", CHAT))["choices"]


async def test_cannot_log_in_is_unavailable_and_reported_by_check(
    executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    def no_credentials() -> ComputeService:
        raise ValueError("Both GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET must be set")

    dispatcher = make_dispatcher(no_credentials, executors)
    try:
        with pytest.raises(BackendUnavailable, match="GLOBUS_COMPUTE_CLIENT_SECRET"):
            await dispatcher.call(endpoint, "chat/completions", CHAT)
        reason = await dispatcher.check()
        assert reason is not None and "cannot log in" in reason
    finally:
        await dispatcher.close()


@pytest.mark.parametrize(
    ("report", "state", "running", "waiting"),
    [
        ({"status": "online", "details": {"total_workers": 8, "idle_workers": 6, "pending_tasks": 1}}, "hot", 2, 1),
        (
            {"status": "online", "details": {"total_workers": 0, "idle_workers": 0, "pending_tasks": 3}},
            "queued",
            None,
            3,
        ),
        ({"status": "online", "details": {"total_workers": 0, "idle_workers": 0, "pending_tasks": 0}}, "cold", 0, 0),
        # The daemon is up, no user endpoint runs: the next task starts one, as a cold start.
        ({"status": "online", "details": {}}, "cold", None, None),
        ({"status": "online"}, "cold", None, None),
        ({"status": "offline", "details": {}}, "offline", None, None),
        (None, "offline", None, None),
    ],
)
def test_globus_status_reports_become_availability(
    report: Any, state: str, running: int | None, waiting: int | None
) -> None:
    availability = availability_of(report)

    assert (availability.state, availability.running, availability.waiting) == (state, running, waiting)
    assert availability.age() < 5


async def test_status_without_workers_submits_nothing(
    dispatcher: GlobusDispatcher, service: ComputeService, executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    service.status = {"status": "online", "details": {"total_workers": 0, "idle_workers": 0, "pending_tasks": 0}}

    availability = await dispatcher.status(endpoint)

    assert availability.state == "cold"
    assert service.status_calls == [GLOBUS_ENDPOINT]
    assert executors.made == []  # a task now would make a batch-scheduled endpoint submit a job


async def test_status_of_a_node_serving_the_model_is_hot_with_its_load(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, compute_service: LocalComputeService, node_dir: Path
) -> None:
    endpoint = site_endpoint(compute_site, simulator_launch(node_dir))
    await site_dispatcher.call(endpoint, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    before = set(compute_service.tasks)

    availability = await site_dispatcher.status(endpoint)

    assert (availability.state, availability.running, availability.waiting) == ("hot", 0, 0)
    assert availability.cold_models == frozenset()
    (task,) = [task for task_id, task in compute_service.tasks.items() if task_id not in before]
    assert task.function_id == compute_site.function_ids["status"]


async def test_status_of_a_node_without_the_model_is_cold(
    site_dispatcher: GlobusDispatcher, compute_site: ComputeSite, tmp_path: Path, node_dir: Path
) -> None:
    elsewhere = site_endpoint(compute_site, {**simulator_launch(node_dir), "state_dir": str(tmp_path)})

    availability = await site_dispatcher.status(elsewhere)

    assert availability.state == "cold" and "starts with a request" in availability.detail


async def test_status_when_every_worker_is_busy_is_unknown_in_time(
    dispatcher: GlobusDispatcher, executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    await dispatcher.call(endpoint, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    release = threading.Event()
    executors.made[0].functions[FUNCTION_IDS["status"]] = lambda request: release.wait(10)
    started = time.monotonic()
    try:
        availability = await dispatcher.status(endpoint)
    finally:
        release.set()

    assert availability.state == "unknown" and "busy" in availability.detail
    assert time.monotonic() - started < 4.5  # inside the tracker's default 5 s probe timeout


async def test_timed_out_tasks_leave_no_threads_and_no_executors(
    service: ComputeService, executors: ExecutorFactory, node_dir: Path
) -> None:
    # One output token every 50 ms: a long answer outlasts the task timeout, a short one does not.
    launch = simulator_launch(node_dir, "--tpot", "0.05")
    patient = globus_endpoint(launch)
    hasty = globus_endpoint(launch, framework="hasty", task_timeout=0.5)
    long_answer = {**CHAT, "max_tokens": 400}
    before = set(threading.enumerate())

    dispatcher = make_dispatcher(service, executors, request_timeout=2.0)
    await dispatcher.start()
    await dispatcher.call(patient, "chat/completions", CHAT)
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(BackendTimeout, match=r"within 0\.5 s"):
            await dispatcher.call(hasty, "chat/completions", long_answer)
    assert time.monotonic() - started < 5
    await dispatcher.close()

    assert len(executors.made) == 1 and executors.made[0].stopped
    deadline = time.monotonic() + 20
    while (left := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert left == [], f"threads left behind: {[t.name for t in left]}"


async def test_a_late_result_after_the_timeout_goes_nowhere(
    service: ComputeService, executors: ExecutorFactory, node_dir: Path
) -> None:
    hasty = globus_endpoint(simulator_launch(node_dir, "--tpot", "0.05"), framework="hasty", task_timeout=0.3)
    dispatcher = make_dispatcher(service, executors)
    slow = threading.Event()

    def answers_late(request: dict[str, Any]) -> dict[str, Any]:
        slow.wait(5)
        return {"ok": True, "response": {"late": True}}

    problems: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: problems.append(context))
    try:
        await dispatcher.call(hasty, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
        executors.made[0].functions[FUNCTION_IDS["inference"]] = answers_late
        with pytest.raises(BackendTimeout):
            await dispatcher.call(hasty, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
        slow.set()
        await asyncio.sleep(0.3)
        assert (await dispatcher.call(hasty, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}))["late"]
    finally:
        await dispatcher.close()
    assert problems == []


@pytest.mark.slow
async def test_the_real_sdk_executor_fails_over_and_leaves_no_threads(node_dir: Path) -> None:
    import globus_sdk
    from globus_compute_sdk import Client
    from globus_compute_sdk.sdk.client import _ComputeWebClient

    before = set(threading.enumerate())
    # A service address where nothing listens (the local service of the other tests holds the SDK's own):
    # the submission itself fails, after the SDK's own retries, as when Globus Compute cannot be reached.
    client = Client(local_compute_services=True, do_version_check=False, authorizer=globus_sdk.NullAuthorizer())
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{unused.getsockname()[1]}"
    client._compute_web_client = _ComputeWebClient(base_url=nowhere, authorizer=globus_sdk.NullAuthorizer())
    dispatcher = GlobusDispatcher(
        relay=LocalRelay(secrets.token_bytes(32)), relay_url=None, request_timeout=5.0, client_factory=lambda: client
    )
    endpoint = globus_endpoint(simulator_launch(node_dir), task_timeout=60)

    with pytest.raises(BackendUnavailable, match="GlobusConnectionError"):
        await dispatcher.call(endpoint, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
    await dispatcher.close()

    deadline = time.monotonic() + 10
    while (left := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert left == [], f"threads left behind: {[t.name for t in left]}"


def test_a_node_serving_one_of_two_models_is_cold_for_the_other() -> None:
    settings = EndpointSettings.model_validate(
        {
            "cluster": "polaris",
            "framework": "vllm",
            "models": ["llama-8b", "mistral-7b"],
            "aliases": {"llama-8b": "meta-llama/Meta-Llama-3-8B-Instruct"},
            "transport": "globus",
            "globus": {"endpoint_id": GLOBUS_ENDPOINT, "function_ids": FUNCTION_IDS},
            "worker_model_server": {"command": ["vllm", "serve", "{model}", "--port", "{port}"]},
        }
    )
    endpoint = Endpoint.from_settings(settings, "")
    report = {
        "ok": True,
        "models": [
            {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "healthy": True, "running": 3, "waiting": 2},
            {"model": "mistral-7b", "healthy": False, "running": 0, "waiting": 0},
        ],
    }

    availability = served_availability(endpoint, report, "4 workers")

    assert (availability.state, availability.running, availability.waiting) == ("hot", 3, 2)
    assert availability.cold_models == {"mistral-7b"}
    with pytest.raises(BackendProtocolError):
        served_availability(endpoint, {"ok": False}, "4 workers")


async def test_an_idle_endpoint_is_not_probed_again_until_its_heartbeat_counts_other_tasks(
    dispatcher: GlobusDispatcher, service: ComputeService, executors: ExecutorFactory, endpoint: Endpoint
) -> None:
    # Every task restarts the user endpoint's idle count: a status task per probe would keep it up for ever.
    details = {"total_workers": 4, "idle_workers": 4, "pending_tasks": 0, "total_tasks": 7}
    service.status = {"status": "online", "details": details}
    first = await dispatcher.status(endpoint)
    (executor,) = executors.made
    assert len(executor.submitted) == 1

    # The next heartbeat counts the probe's own task, or has not come yet: the last report stands.
    for total in (8, 7, 8):
        service.status = {"status": "online", "details": {**details, "total_tasks": total}}
        again = await dispatcher.status(endpoint)
        assert again.state == first.state and again.observed_at > first.observed_at
    assert len(executor.submitted) == 1

    # Other tasks ran (requests, from this gateway or another): the node is asked again.
    service.status = {"status": "online", "details": {**details, "total_tasks": 10}}
    await dispatcher.status(endpoint)
    assert len(executor.submitted) == 2
