"""The ``globus`` transport: the compute functions run on a Globus Compute endpoint's workers.

Requests become tasks of the registered ``inference`` function, submitted through a
``globus_compute_sdk.Executor``; the dispatcher holds one executor per Globus Compute
endpoint, made on first use. With the relay (``relay.url``), a task only hands its
requests to the node's request server and returns, and every answer, whole ones
too, comes back through the relay ending with its outcome (as under ``parsl``): the
SDK's result listener, which looks for results every half second, is then off the
request's path. The requests that come in one turn of the event loop go in one task,
and the executor sends the tasks queued meanwhile in one call to the service.
Without the relay, a task carries one request and its whole answer. The executor's methods only queue
work and hand back ``concurrent.futures.Future`` objects, so nothing here blocks
the event loop; the few blocking SDK calls (making the client, asking an
endpoint's status) run on the dispatcher's own small thread pool.

The SDK is imported only when an executor or client is first needed: importing
it starts a thread, and a gateway without ``globus`` endpoints should not pay for it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol, TypeVar, cast

import orjson

from gateway.config import GlobusComputeSettings
from gateway.dispatch.base import BackendFailure, BackendProtocolError, BackendTimeout, BackendUnavailable, Dispatcher
from gateway.dispatch.compute import answer_of, compute_request, served_availability
from gateway.dispatch.futures import result_of
from gateway.dispatch.relayed import STATUS_LIMIT, relayed_outcome, streamed_events, whole_answer
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint
from gateway.streaming.channels import NodeChannels
from gateway.streaming.relay import Inbox, Relay

log = logging.getLogger("gateway.dispatch.globus")

# Beyond the model server's startup and the request itself: the round trips through the Globus Compute service.
_TASK_MARGIN = 60.0
# A task carries at most this much of its requests' bodies: the service refuses a submission call over 10 MB, and
# the executor may send several tasks in one call.
_GROUP_BYTES = 1 << 20

T = TypeVar("T")


class ComputeExecutor(Protocol):
    """What the dispatcher uses of ``globus_compute_sdk.Executor``."""

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
    ) -> Future[Any]: ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class ComputeClient(Protocol):
    """What the gateway uses of ``globus_compute_sdk.Client``."""

    def get_endpoint_status(self, endpoint_uuid: str) -> dict[str, Any]: ...

    def register_function(self, function: Callable[..., Any], description: str | None = None) -> str: ...


ClientFactory = Callable[[], ComputeClient]
ExecutorFactory = Callable[[ComputeClient, GlobusComputeSettings], ComputeExecutor]


def sdk_client() -> ComputeClient:
    """A Globus Compute client; it logs in with ``GLOBUS_COMPUTE_CLIENT_ID``/``_SECRET`` when they are set."""
    from globus_compute_sdk import Client

    return cast(ComputeClient, Client())


def sdk_executor(client: ComputeClient, settings: GlobusComputeSettings) -> ComputeExecutor:
    from globus_compute_sdk import Client, Executor

    return cast(
        ComputeExecutor,
        Executor(
            endpoint_id=str(settings.endpoint_id),
            client=cast(Client, client),
            amqp_port=settings.amqp_port,
            api_burst_limit=settings.api_burst_limit,
            api_burst_window_s=settings.api_burst_window,
        ),
    )


def _stop_result_watchers() -> None:
    """Stop the SDK's result-listening threads.

    The SDK keeps one such thread per task group, shared by every executor of
    the process, and an executor's shutdown leaves it running. It also holds the
    future of every task that never reported back, so without this a gateway
    that gave up on a task of a vanished endpoint could not exit.
    """
    module = sys.modules.get("globus_compute_sdk.sdk.executor")
    if module is None:
        return
    for watcher in list(module._RESULT_WATCHERS.values()):
        watcher.shutdown(wait=True, cancel_futures=True)


def availability_of(status: Any) -> Availability:
    """An ``Availability`` from the Globus Compute service's report on an endpoint."""
    if not isinstance(status, dict) or status.get("status") != "online":
        state = status.get("status") if isinstance(status, dict) else None
        return Availability("offline", detail=f"Globus Compute endpoint is {state or 'not reporting'}")
    details = status.get("details")
    if not isinstance(details, dict) or not isinstance(details.get("total_workers"), int):
        # The daemon runs but no user endpoint does (it stopped when idle, or never had a task): the next task
        # starts it, and its workers, which takes as long as a cold start.
        return Availability("cold", detail="no user endpoint runs; a request starts it and its workers")
    workers = int(details["total_workers"])
    idle = details.get("idle_workers")
    pending = details.get("pending_tasks")
    running = workers - idle if isinstance(idle, int) else None
    waiting = pending if isinstance(pending, int) else None
    if workers > 0:
        return Availability("hot", detail=f"{workers} workers", running=running, waiting=waiting)
    if waiting:
        return Availability("queued", detail="tasks wait for the scheduler to start workers", waiting=waiting)
    return Availability("cold", detail="no workers; a request waits for the scheduler", running=0, waiting=0)


class _Group:
    """Requests that go to one endpoint's request servers in one task, with the size of their bodies."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []
        self.size = 0


class GlobusDispatcher(Dispatcher):
    """Runs the compute functions on Globus Compute endpoints; see the module docstring.

    ``client_factory`` and ``executor_factory`` are the SDK boundary: by default
    a ``globus_compute_sdk.Client`` and one ``Executor`` per endpoint. Streamed
    answers come back through ``relay``, which workers reach at ``relay_url``.
    """

    def __init__(
        self,
        *,
        relay: Relay,
        relay_url: str | None,
        request_timeout: float,
        client_factory: ClientFactory = sdk_client,
        executor_factory: ExecutorFactory = sdk_executor,
        channels: NodeChannels | None = None,
    ) -> None:
        self._relay = relay
        self._channels = channels
        # By endpoint id: how many requests went down its node channels, for the status probe (see ``status``).
        self._channelled: dict[str, int] = {}
        self._relay_url = relay_url
        self._request_timeout = request_timeout
        self._client_factory = client_factory
        self._executor_factory = executor_factory
        self._client: ComputeClient | None = None
        self._client_lock = threading.Lock()
        self._client_error: str | None = None
        self._executors: dict[str, ComputeExecutor] = {}
        self._creating = asyncio.Lock()
        # By Globus Compute endpoint: the requests that go in the next hand-over task.
        self._groups: dict[str, _Group] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._blocking = ThreadPoolExecutor(max_workers=2, thread_name_prefix="globus-dispatch")
        # Per endpoint: the task count of the heartbeat behind the last node report, and that report.
        self._node_reports: dict[str, tuple[int, int, Availability]] = {}

    @staticmethod
    def _settings(endpoint: Endpoint) -> GlobusComputeSettings:
        if endpoint.globus is None:
            raise BackendUnavailable(endpoint, "endpoint has no Globus Compute settings")
        return endpoint.globus

    def _task_timeout(self, endpoint: Endpoint) -> float:
        configured = self._settings(endpoint).task_timeout
        if configured is not None:
            return configured
        startup = float((endpoint.worker_model_server or {}).get("startup_timeout") or 0.0)
        return startup + self._request_timeout + _TASK_MARGIN

    def _request(
        self, endpoint: Endpoint, op: str, payload: dict[str, Any], stream: dict[str, str] | None = None
    ) -> dict[str, Any]:
        if endpoint.worker_model_server is None:
            raise BackendUnavailable(endpoint, "no worker_model_server: the workers would not know what to start")
        return compute_request(
            op, payload, model_server=endpoint.worker_model_server, timeout=self._request_timeout, stream=stream
        )

    async def _in_thread(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._blocking, function)

    def _new_client(self) -> ComputeClient:
        # Called from the dispatcher's threads: a status probe and a first request may ask at once.
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = self._client_factory()
                except Exception as exc:
                    self._client_error = f"cannot log in to Globus Compute: {exc.__class__.__name__}: {exc}"
                    raise
                self._client_error = None
            return self._client

    async def _executor(self, endpoint: Endpoint) -> ComputeExecutor:
        settings = self._settings(endpoint)
        key = str(settings.endpoint_id)
        executor = self._executors.get(key)
        if executor is not None:
            return executor
        async with self._creating:
            executor = self._executors.get(key)
            if executor is None:
                try:
                    executor = await self._in_thread(lambda: self._executor_factory(self._new_client(), settings))
                except Exception as exc:
                    log.warning("cannot reach Globus Compute for %s: %s", endpoint.id, exc)
                    raise BackendUnavailable(endpoint, f"cannot reach Globus Compute: {exc}") from None
                self._executors[key] = executor
        return executor

    def _discard(self, endpoint: Endpoint, executor: ComputeExecutor) -> None:
        """Drop an executor whose submission failed; the SDK stops such an executor for good."""
        key = str(self._settings(endpoint).endpoint_id)
        if self._executors.get(key) is executor:
            del self._executors[key]
        executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _refuse_if_offline(endpoint: Endpoint) -> None:
        # Globus Compute queues tasks for an offline endpoint until it returns, which
        # would hold the request until its timeout; refusing now lets failover act.
        if endpoint.state(time.time()) == "offline":
            raise BackendUnavailable(endpoint, endpoint.availability.detail or "Globus Compute endpoint is offline")

    async def run(self, endpoint: Endpoint, function: str, request: dict[str, Any], limit: float | None = None) -> Any:
        """Run the registered compute function ``function`` with ``request`` on ``endpoint`` and return its result.

        Raises ``BackendTimeout`` when no result comes within ``limit`` seconds (by
        default the endpoint's task timeout), ``BackendUnavailable`` when the task
        could not be submitted or its worker was lost, and ``BackendProtocolError``
        when the function raised on the worker. Giving up never cancels the SDK's
        future (see ``result_of``).
        """
        settings = self._settings(endpoint)
        function_id = getattr(settings.function_ids, function, None) if settings.function_ids else None
        if function_id is None:
            raise BackendUnavailable(endpoint, f"no function id registered for {function!r}")
        limit = limit or self._task_timeout(endpoint)
        executor = await self._executor(endpoint)
        try:
            future = executor.submit_to_registered_function(str(function_id), args=(request,))
        except RuntimeError:
            # The executor stopped itself after an earlier failure; a new one may work.
            self._discard(endpoint, executor)
            executor = await self._executor(endpoint)
            future = executor.submit_to_registered_function(str(function_id), args=(request,))
        try:
            async with asyncio.timeout(limit):
                return await result_of(future)
        except TimeoutError:
            raise BackendTimeout(endpoint, f"no result from Globus Compute within {limit:g} s") from None
        except Exception as exc:
            failure = _failure(endpoint, exc)
            if isinstance(failure, BackendUnavailable):
                self._discard(endpoint, executor)
            raise failure from None

    async def call(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._relay_url is None:
            self._refuse_if_offline(endpoint)
            # Without the relay, the task carries the answer: it comes with the SDK's result listener.
            return answer_of(endpoint, await self.run(endpoint, "inference", self._request(endpoint, op, payload)))
        return await whole_answer(endpoint, self._relayed(endpoint, op, payload, stream=False))

    def stream(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        return streamed_events(endpoint, lambda: self._relayed(endpoint, op, payload, stream=True))

    def _relayed(
        self, endpoint: Endpoint, op: str, payload: dict[str, Any], *, stream: bool
    ) -> AsyncGenerator[bytes | dict[str, Any], None]:
        """The events and outcome of a request handed to the node's request server (see ``relayed_outcome``)."""
        self._refuse_if_offline(endpoint)
        if self._relay_url is None:
            raise BackendUnavailable(endpoint, "relay.url is not set, so workers cannot stream answers back")
        settings = self._settings(endpoint)
        timeout = self._task_timeout(endpoint)

        def request_for(relay: dict[str, str] | None) -> dict[str, Any]:
            if endpoint.worker_model_server is None:
                raise BackendUnavailable(endpoint, "no worker_model_server: the workers would not know what to start")
            return compute_request(
                op,
                payload if bool(payload.get("stream")) == stream else {**payload, "stream": stream},
                model_server=endpoint.worker_model_server,
                timeout=self._request_timeout,
                stream=relay,
                node_requests=settings.requests_per_node,
            )

        async def offer(inbox: Inbox) -> bool:
            assert self._channels is not None
            if not await self._channels.offer(self._channel_id(endpoint), request_for(None), inbox):
                return False
            self._channelled[endpoint.id] = self._channelled.get(endpoint.id, 0) + 1
            return True

        async def run(relay: dict[str, str], inbox: Inbox) -> Any:
            request = request_for(relay)
            if self._channels is not None:
                # No node has dialled in yet, or all that did are full: a task finds or starts a request server,
                # and the invitation makes it dial in.
                assert self._relay_url is not None
                request["channel"] = self._channels.invitation(self._channel_id(endpoint), self._relay_url)
            # The task ends once the request server has the request; its result only says so (or why not).
            try:
                async with asyncio.timeout(timeout):
                    return await self._hand_over(endpoint, request)
            except TimeoutError:
                raise BackendTimeout(endpoint, f"no result from Globus Compute within {timeout:g} s") from None

        return relayed_outcome(
            endpoint,
            self._relay,
            self._relay_url,
            run,
            wait=timeout,
            idle=self._request_timeout,
            offer=offer if self._channels is not None else None,
        )

    def _channel_id(self, endpoint: Endpoint) -> str:
        """The node channels of ``endpoint``'s request servers: one kind per Globus Compute endpoint and node setup."""
        assert self._channels is not None
        settings = self._settings(endpoint)
        state_dir = str((endpoint.worker_model_server or {}).get("state_dir"))
        held = settings.requests_per_node
        return self._channels.key(("globus", str(settings.endpoint_id), str(held), state_dir), held)

    def _hand_over(self, endpoint: Endpoint, request: dict[str, Any]) -> asyncio.Future[Any]:
        """A future of the result of the task that carries ``request`` with the others of this turn of the loop."""
        key = str(self._settings(endpoint).endpoint_id)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        size = len(orjson.dumps(request["payload"]))
        group = self._groups.get(key)
        if group is None or group.size + size > _GROUP_BYTES:
            group = self._groups[key] = _Group()
            # After the callbacks already due: the requests that came with this one join it.
            self._sending.add(task := asyncio.get_running_loop().create_task(self._send(endpoint, key, group)))
            task.add_done_callback(self._sending.discard)
        group.requests.append((request, future))
        group.size += size
        return future

    async def _send(self, endpoint: Endpoint, key: str, group: _Group) -> None:
        await asyncio.sleep(0)
        if self._groups.get(key) is group:
            del self._groups[key]
        requests = [request for request, _ in group.requests]
        try:
            result = await self.run(endpoint, "inference", {"group": requests}, limit=self._task_timeout(endpoint))
        except BaseException as exc:
            for _, future in group.requests:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        # A waiter that gave up (its timeout, its client gone) was cancelled already.
        for _, future in group.requests:
            if not future.done():
                future.set_result(result)

    async def status(self, endpoint: Endpoint) -> Availability:
        """What the Globus Compute service reports of ``endpoint`` and, when it has workers, what one of them serves.

        The ``status`` function runs only while workers are up: on a batch-scheduled
        endpoint without workers, a task would make it submit a job. Nor does it run
        while the heartbeat says that no task ran since the last report but that
        report's own, unless requests went down the endpoint's node channels since:
        every task restarts the user endpoint's idle count, so a probe each
        ``status_interval`` would keep an idle endpoint, and its nodes, forever, while
        a node busy only with its channel's requests runs no task and would be stopped
        as idle under them. A connected node channel makes the endpoint hot whatever
        the service reports: its node takes requests.
        """
        settings = self._settings(endpoint)
        endpoint_id = str(settings.endpoint_id)
        report = await self._in_thread(lambda: self._new_client().get_endpoint_status(endpoint_id))
        seen = availability_of(report)
        nodes = self._channels.connected(self._channel_id(endpoint)) if self._channels is not None else 0
        if nodes and seen.state != "hot":
            seen = Availability("hot", detail=f"{nodes} node channels connected; the service: {seen.detail}")
        if seen.state != "hot" or settings.function_ids is None or settings.function_ids.status is None:
            self._node_reports.pop(endpoint.id, None)
            return seen
        tasks = (report.get("details") or {}).get("total_tasks") if isinstance(report, dict) else None
        channelled = self._channelled.get(endpoint.id, 0)
        last = self._node_reports.get(endpoint.id)
        # A user endpoint started again counts from 0 and is probed once: one that never ran a task stops only
        # after idle_heartbeats_hard (8 hours by default), one that did after idle_heartbeats_soft.
        if isinstance(tasks, int) and last is not None and last[0] <= tasks <= last[0] + 1 and last[1] == channelled:
            return replace(last[2], observed_at=time.time())
        state_dir = (endpoint.worker_model_server or {}).get("state_dir")
        # The worker names the batch job it runs in, for /resource_server/{cluster}/jobs.
        request = {"model_server": {"state_dir": state_dir}, "scheduler": "none", "own_job": True}
        try:
            node = await self.run(endpoint, "status", request, limit=STATUS_LIMIT)
        except BackendFailure as exc:
            return Availability("unknown", detail=f"{seen.detail}, busy: {exc.detail}")
        served = served_availability(endpoint, node, seen.detail)
        served = replace(served, jobs=tuple(job for job in node.get("jobs") or () if isinstance(job, dict)))
        if isinstance(tasks, int):
            self._node_reports[endpoint.id] = (tasks, channelled, served)
        return served

    async def check(self) -> str | None:
        return self._client_error

    async def close(self) -> None:
        for task in list(self._sending):
            task.cancel()
        executors, self._executors = list(self._executors.values()), {}
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
        if executors:
            await self._in_thread(_stop_result_watchers)
        self._blocking.shutdown(wait=False, cancel_futures=True)


def _failure(endpoint: Endpoint, error: BaseException) -> BackendFailure:
    """The typed error for an SDK future's exception."""
    from globus_compute_sdk.errors import TaskExecutionFailed

    if isinstance(error, TaskExecutionFailed):
        lines = [line.strip() for line in error.remote_data.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else "no detail"
        if TaskExecutionFailed.WORKER_LOST_REGEX.search(error.remote_data):
            # The node went away (walltime, preemption) before answering; another endpoint may serve it.
            return BackendUnavailable(endpoint, f"worker lost: {last}")
        log.warning("%s: compute function raised on the worker:\n%s", endpoint.id, error.remote_data)
        return BackendProtocolError(endpoint, f"compute function raised on the worker: {last}")
    log.warning("%s: Globus Compute task failed: %s: %s", endpoint.id, error.__class__.__name__, error)
    return BackendUnavailable(endpoint, f"Globus Compute: {error.__class__.__name__}: {error}")
