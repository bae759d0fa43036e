"""The ``parsl`` transport: the compute functions run on the workers of Parsl executors the gateway owns.

Each endpoint's ``parsl`` settings describe a ``HighThroughputExecutor`` and its provider (``local``, ``slurm`` or
``pbspro``, their options passed through); endpoints of one cluster with the same settings share one executor, so
one worker pool. All executors belong to one ``DataFlowKernel``, started in a thread when the gateway starts (the
first block takes seconds to connect) and cleaned up when it stops; requests that come first wait for it.

Tasks go straight to the executor (``HighThroughputExecutor.submit``); their futures are awaited without ever
being cancelled (see ``gateway.dispatch.futures``). A streamed answer comes back through the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernel
from parsl.executors import HighThroughputExecutor
from parsl.executors.errors import BadStateException
from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
from parsl.jobs.states import JobState

from gateway.config import EndpointSettings, ParslSettings
from gateway.dispatch.base import (
    BackendFailure,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    Dispatcher,
)
from gateway.dispatch.compute import (
    answer_of,
    compute_request,
    load_function,
    served_availability,
)
from gateway.dispatch.futures import result_of
from gateway.dispatch.relayed import STATUS_LIMIT, logged, relayed_outcome, streamed_events, whole_answer
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint
from gateway.parsl_providers import LAUNCHERS, PROVIDERS
from gateway.streaming.channels import NodeChannels
from gateway.streaming.relay import Inbox, Relay

log = logging.getLogger("gateway.dispatch.parsl")

# The interchange runs in a process group of its own, so that a terminal's Ctrl-C (or a signal to the gateway's
# group) reaches only the gateway, which then stops Parsl in order; Parsl's cleanup waits forever for an interchange
# that died first. It still dies with the gateway: the kernel signals it when its parent goes (Linux).
_OWN_GROUP = (
    "import ctypes, os, signal, sys; os.setpgrp(); "
    "sys.platform == 'linux' and ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
# Beyond the model server's startup and the request itself: pickling, the interchange, a busy worker.
_TASK_MARGIN = 30.0


class _Executor(HighThroughputExecutor):
    """A ``HighThroughputExecutor`` whose outstanding tasks include the requests its nodes' request servers hold.

    Parsl scales blocks by its outstanding tasks: with none for ``max_idletime`` it cancels the blocks, and with
    more than its workers it asks for more. A hand-over task lasts milliseconds and a request down a node channel is
    no task at all, so a node busy with hundreds of requests would look idle, and its job (with the model server)
    would be cancelled under them. ``held`` requests count as the worker slots they fill: a node's workers hold
    ``requests_per_node`` of them.
    """

    held = 0
    requests_per_slot = 1.0
    # Launched by the gateway as soon as the executor starts (see ``ParslDispatcher._load``), not by Parsl.
    initial_blocks = 0

    def outstanding(self) -> int:
        return len(self.tasks) + math.ceil(self.held / self.requests_per_slot)

    def hold(self, inbox: Inbox) -> None:
        """Count the request whose events reach ``inbox`` among the outstanding tasks until the inbox closes.

        Counted here rather than by a generator around the request's events, which every event would pass through.
        """
        if not inbox.closed:
            self.held += 1
            inbox.when_closed(self._release)

    def _release(self, inbox: Inbox) -> None:
        self.held -= 1


def build_executor(label: str, settings: ParslSettings) -> HighThroughputExecutor:
    """The ``HighThroughputExecutor`` that ``settings`` describe."""
    options = dict(settings.provider_options)
    if settings.launcher is not None:
        options["launcher"] = LAUNCHERS[settings.launcher]()
    provider = PROVIDERS[settings.provider](
        # Parsl launches a provider's initial blocks at its strategy's first tick after the executor started, up
        # to ``strategy_period`` (5 s) later: the dispatcher launches them itself at once instead.
        init_blocks=0,
        min_blocks=settings.min_blocks,
        max_blocks=settings.max_blocks,
        worker_init=settings.worker_init,
        **options,
    )
    # Parsl starts its helper scripts by name from PATH. The gateway may run from a virtualenv that is not on
    # PATH; the interchange always runs here, and so do the workers of the local provider.
    scripts = Path(sys.executable).parent
    extra: dict[str, Any] = {}
    if (scripts / "interchange.py").exists():
        extra["interchange_launch_cmd"] = [sys.executable, "-c", _OWN_GROUP, str(scripts / "interchange.py")]
    if settings.provider == "local" and (scripts / "process_worker_pool.py").exists():
        pool = shlex.quote(str(scripts / "process_worker_pool.py"))
        extra["launch_cmd"] = DEFAULT_LAUNCH_CMD.replace("process_worker_pool.py", pool, 1)
    executor = _Executor(
        label=label,
        provider=provider,
        max_workers_per_node=settings.worker_processes,
        # Parsl also caps the workers at cores / cores_per_worker (one per core by default). The workers wait on the
        # model server, so this share makes the cap ``worker_processes`` on any node of one core or more.
        cores_per_worker=1.0 / settings.worker_processes,
        heartbeat_period=settings.heartbeat_period,
        heartbeat_threshold=settings.heartbeat_threshold,
        **extra,
    )
    executor.requests_per_slot = settings.requests_per_node / settings.worker_processes
    executor.initial_blocks = settings.init_blocks
    return executor


class ParslDispatcher(Dispatcher):
    """Runs the compute functions on Parsl executors owned by the gateway; see the module docstring."""

    def __init__(
        self,
        endpoints: Sequence[EndpointSettings],
        *,
        relay: Relay,
        relay_url: str | None,
        request_timeout: float,
        state_dir: Path,
        channels: NodeChannels | None = None,
    ) -> None:
        self._relay = relay
        self._channels = channels
        self._relay_url = relay_url
        self._request_timeout = request_timeout
        self._run_dir = state_dir / "parsl"
        self._executors: dict[str, HighThroughputExecutor] = {}
        self._settings: dict[str, ParslSettings] = {}
        self._model_server: dict[str, dict[str, Any]] = {}
        self._task_timeout: dict[str, float] = {}
        shared: dict[tuple[str, str], HighThroughputExecutor] = {}
        for settings in endpoints:
            endpoint_id = f"{settings.cluster}/{settings.framework}"
            parsl, launch = settings.parsl, settings.worker_model_server
            assert parsl is not None and launch is not None
            key = (settings.cluster, parsl.model_dump_json())
            if key not in shared:
                shared[key] = build_executor(f"{settings.cluster}-{len(shared)}", parsl)
            self._executors[endpoint_id] = shared[key]
            self._settings[endpoint_id] = parsl
            model_server = launch.model_dump()
            if model_server["state_dir"] is None and parsl.provider == "local":
                # The workers run on this machine: their model servers keep their files beside the gateway's.
                model_server["state_dir"] = str(state_dir / "servers")
            self._model_server[endpoint_id] = model_server
            self._task_timeout[endpoint_id] = launch.startup_timeout + request_timeout + _TASK_MARGIN
        self._inference = load_function("inference")
        self._status = load_function("status")
        self._handovers: dict[str, _Handover] = {}
        self._loading: asyncio.Task[DataFlowKernel] | None = None
        self._log_handler: logging.Handler | None = None

    def _load(self) -> DataFlowKernel:
        # Parsl's own log setup wants process and thread ids, which the gateway's logging does not record, and
        # logs every task at DEBUG, which costs time per request: its INFO lines go to a file of their own.
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self._run_dir / "parsl.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s:%(lineno)d %(levelname)s: %(message)s"))
        parsl_log = logging.getLogger("parsl")
        parsl_log.propagate = False
        parsl_log.setLevel(logging.INFO)
        parsl_log.addHandler(self._log_handler)
        executors = list({id(executor): executor for executor in self._executors.values()}.values())
        config = Config(
            executors=executors,
            strategy_period=min(settings.strategy_period for settings in self._settings.values()),
            run_dir=str(self._run_dir),
            usage_tracking=0,
            initialize_logging=False,
        )
        dfk = DataFlowKernel(config)
        # No task reaches an executor before this returns, so Parsl's strategy (which adds blocks only for tasks,
        # and takes none away below ``min_blocks``) does not race these.
        for executor in executors:
            if isinstance(executor, _Executor) and executor.initial_blocks:
                executor.scale_out_facade(executor.initial_blocks)
        return dfk

    async def start(self) -> None:
        if self._executors:
            self._loading = asyncio.create_task(asyncio.to_thread(self._load), name="parsl-start")

    async def close(self) -> None:
        if self._loading is None:
            return
        try:
            dfk = await self._loading
        except Exception:
            dfk = None
        if dfk is not None:
            failed = [executor for executor in set(self._executors.values()) if _failed_if_interchange_gone(executor)]
            # Cleaning up would wait forever for a dead interchange's answer to the scale-in, so a failed executor
            # is not scaled in: its blocks are cancelled here instead, or they would run on until they miss the
            # interchange's heartbeat.
            for executor in failed:
                jobs = [job for job in executor.blocks_to_job_id.values() if job]
                if jobs and executor.provider is not None:
                    await asyncio.to_thread(executor.provider.cancel, jobs)
            await asyncio.to_thread(dfk.cleanup)
        if self._log_handler is not None:
            logging.getLogger("parsl").removeHandler(self._log_handler)
            self._log_handler.close()

    async def check(self) -> str | None:
        if self._loading is None or not self._loading.done():
            return None
        if self._loading.cancelled() or self._loading.exception() is not None:
            return f"Parsl did not start: {self._loading.exception()}"
        broken = [executor.label for executor in set(self._executors.values()) if _failed_if_interchange_gone(executor)]
        return f"Parsl executors failed: {', '.join(sorted(broken))}" if broken else None

    async def _executor(self, endpoint: Endpoint) -> HighThroughputExecutor:
        assert self._loading is not None, "the dispatcher was not started"
        try:
            await asyncio.shield(self._loading)
        except Exception as exc:
            raise BackendUnavailable(endpoint, f"Parsl did not start: {exc}") from None
        return self._executors[endpoint.id]

    async def _run(self, endpoint: Endpoint, function: Any, request: dict[str, Any], limit: float) -> Any:
        """Run ``function(request)`` on a worker of ``endpoint``'s executor and return what it returns."""
        executor = await self._executor(endpoint)
        try:
            future = executor.submit(function, {}, request)
        except Exception as exc:
            raise BackendUnavailable(endpoint, f"Parsl refused the task: {exc.__class__.__name__}: {exc}") from None
        return await _result(endpoint, result_of(future), limit)

    async def run(self, endpoint: Endpoint, function: str, request: dict[str, Any], limit: float | None = None) -> Any:
        """Run the compute function named ``function`` (a key of ``FUNCTIONS``) on a worker of ``endpoint``.

        Raises what a request would: ``BackendUnavailable``, ``BackendTimeout`` (after ``limit`` seconds, by
        default the endpoint's task timeout) or ``BackendProtocolError``.
        """
        limit = limit or self._task_timeout[endpoint.id]
        return await self._run(endpoint, load_function(function), request, limit)

    def model_server(self, endpoint: Endpoint) -> dict[str, Any]:
        """The ``model_server`` argument of the compute functions for ``endpoint``."""
        return self._model_server[endpoint.id]

    async def call(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._relay_url is None:
            # Without the relay, the task carries the answer and holds its worker until then.
            request = compute_request(
                op, payload, model_server=self._model_server[endpoint.id], timeout=self._request_timeout
            )
            result = await self._run(endpoint, self._inference, request, self._task_timeout[endpoint.id])
            return answer_of(endpoint, logged(endpoint, result))
        return await whole_answer(endpoint, self._relayed(endpoint, op, payload, stream=False))

    def stream(self, endpoint: Endpoint, op: str, payload: dict[str, Any]) -> AsyncIterator[bytes]:
        return streamed_events(endpoint, lambda: self._relayed(endpoint, op, payload, stream=True))

    def _relayed(
        self, endpoint: Endpoint, op: str, payload: dict[str, Any], *, stream: bool
    ) -> AsyncGenerator[bytes | dict[str, Any], None]:
        """The events and outcome of a request served by the node's request server (see ``relayed_outcome``)."""
        if self._relay_url is None:
            raise BackendUnavailable(endpoint, "relay.url is not set, so workers cannot stream answers back")
        relay_url = self._relay_url
        timeout = self._task_timeout[endpoint.id]
        held = self._settings[endpoint.id].requests_per_node

        def request_for(relay: dict[str, str] | None) -> dict[str, Any]:
            return compute_request(
                op,
                payload if bool(payload.get("stream")) == stream else {**payload, "stream": stream},
                model_server=self._model_server[endpoint.id],
                timeout=self._request_timeout,
                stream=relay,
                node_requests=held,
            )

        async def channel_id() -> str:
            executor = await self._executor(endpoint)
            key = (executor.label, str(held), str(self._model_server[endpoint.id]["state_dir"]))
            assert self._channels is not None
            return self._channels.key(key, held)

        async def offer(inbox: Inbox) -> bool:
            counted = self._executors[endpoint.id]
            if isinstance(counted, _Executor):
                counted.hold(inbox)
            if self._channels is None:
                return False
            return await self._channels.offer(await channel_id(), request_for(None), inbox)

        async def run(relay: dict[str, str], inbox: Inbox) -> Any:
            request = request_for(relay)
            executor = await self._executor(endpoint)
            if self._channels is not None:
                # No node has dialled in yet, or all that did are full: Parsl finds or starts a request server,
                # and the invitation makes it dial in.
                request["channel"] = self._channels.invitation(await channel_id(), relay_url)
            handover = self._handovers.get(executor.label)
            if handover is None:
                workers = self._settings[endpoint.id].worker_processes
                handover = self._handovers[executor.label] = _Handover(executor, self._inference, workers)
            # The task ends once the node's request server has the request: its limit is the wait for a free slot.
            return await _result(endpoint, handover.hand_over(request), timeout)

        return relayed_outcome(
            endpoint, self._relay, relay_url, run, wait=timeout, idle=self._request_timeout, offer=offer
        )

    async def status(self, endpoint: Endpoint) -> Availability:
        """From the executor's blocks and workers, the scheduler's jobs, and a worker's view of its model servers."""
        if self._loading is None or not self._loading.done():
            return Availability("starting", detail="Parsl is starting")
        if self._loading.cancelled() or self._loading.exception() is not None:
            return Availability("offline", detail=f"Parsl did not start: {self._loading.exception()}")
        executor = self._executors[endpoint.id]
        if _failed_if_interchange_gone(executor):
            return Availability("offline", detail=f"the Parsl executor failed: {executor.executor_exception}")
        jobs = await self._scheduler_jobs(endpoint, executor)
        managers = await asyncio.to_thread(executor.connected_managers)
        workers = sum(int(manager.get("worker_count", 0)) for manager in managers if manager.get("active", True))
        if workers == 0:
            if jobs:
                # The scheduler's view is fresh; Parsl asks a batch scheduler about its blocks once a minute only.
                scheduled = {job["state"] for job in jobs}
                running, waiting = bool(scheduled - {"queued"}), "queued" in scheduled
            else:
                # The local provider, or no answer from the scheduler: Parsl's own view of its blocks.
                states = {status.state for status in executor.status_facade.values()}
                running, waiting = JobState.RUNNING in states, JobState.PENDING in states
            if running:
                return Availability("starting", detail="the workers' job runs; they are connecting", jobs=jobs)
            if waiting:
                estimated = [_epoch(job.get("estimated_start")) for job in jobs if job["state"] == "queued"]
                start = min((when for when in estimated if when is not None), default=None)
                return Availability("queued", detail=_waiting(jobs), estimated_start=start, jobs=jobs)
            return Availability("cold", detail="no workers; a request starts them", jobs=jobs)
        request = {"model_server": {"state_dir": self._model_server[endpoint.id]["state_dir"]}, "scheduler": "none"}
        if self._settings[endpoint.id].provider == "local":
            # The workers' node is this machine: look without taking a worker from the requests.
            report = await asyncio.to_thread(self._status, request)
        else:
            try:
                report = await self._run(endpoint, self._status, request, STATUS_LIMIT)
            except BackendFailure as exc:
                return Availability("unknown", detail=f"{workers} workers, busy: {exc.detail}", jobs=jobs)
        return replace(served_availability(endpoint, report, f"{workers} workers"), jobs=jobs)

    async def _scheduler_jobs(self, endpoint: Endpoint, executor: HighThroughputExecutor) -> tuple[dict[str, Any], ...]:
        """The scheduler's entries for the executor's blocks; the provider's commands work where the gateway runs."""
        provider = self._settings[endpoint.id].provider
        job_ids = [job_id for job_id in executor.blocks_to_job_id.values() if job_id]
        if provider == "local" or not job_ids:
            return ()
        report = await asyncio.to_thread(self._status, {"scheduler": provider, "job_ids": job_ids})
        if report.get("scheduler_error"):
            log.warning("%s: %s", endpoint.id, report["scheduler_error"])
        return tuple(report.get("jobs", []))


async def _result(endpoint: Endpoint, waiting: Awaitable[Any], limit: float) -> Any:
    """What a task returns, or the typed failure of its worker, its executor or the wait of ``limit`` seconds."""
    try:
        async with asyncio.timeout(limit):
            return await waiting
    except TimeoutError:
        raise BackendTimeout(endpoint, f"no result from the worker within {limit:g} s") from None
    except _Refused as exc:
        raise BackendUnavailable(endpoint, f"Parsl refused the task: {exc}") from None
    except BadStateException as exc:
        raise BackendUnavailable(endpoint, f"the Parsl executor failed: {exc}") from None
    except Exception as exc:
        # WorkerLost, ManagerLost, or the function raised: the worker did not finish its answer.
        log.warning("%s: task failed on the worker: %s: %s", endpoint.id, exc.__class__.__name__, exc)
        raise BackendProtocolError(endpoint, f"the worker failed: {exc.__class__.__name__}: {exc}") from None


class _Refused(Exception):
    """The executor did not take a task."""


class _Handover:
    """The hand-overs of one executor's requests to their nodes' request servers, grouped while the workers are busy.

    A task's journey through Parsl (interchange, the node's manager, a worker, and its result back) costs a few
    milliseconds of several processes' CPU whatever it carries, and caps an executor at a few hundred tasks a second
    on a small machine. So at most ``in_flight`` hand-over tasks are under way at once; requests that come meanwhile
    wait, and go together in the next task as soon as one comes back. When requests are few, each goes at once in
    a task of its own.
    """

    def __init__(self, executor: HighThroughputExecutor, function: Any, in_flight: int) -> None:
        self._executor = executor
        self._function = function
        self._in_flight = in_flight
        self._under_way = 0
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[Any]]] = []

    def hand_over(self, request: dict[str, Any]) -> asyncio.Future[Any]:
        """A future of the result of the task that carried ``request`` (``{"ok": True, "relayed": True}``)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._under_way < self._in_flight:
            self._send()
        return future

    def _send(self) -> None:
        group, self._waiting = self._waiting, []
        try:
            task = self._executor.submit(self._function, {}, {"group": [request for request, _ in group]})
        except Exception as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(_Refused(f"{exc.__class__.__name__}: {exc}"))
            return
        self._under_way += 1
        loop = asyncio.get_running_loop()

        def settle_soon(done: Future[Any]) -> None:
            # A closed loop raises RuntimeError here: nobody waits any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._settle, done, group)

        task.add_done_callback(settle_soon)

    def _settle(self, task: Future[Any], group: list[tuple[dict[str, Any], asyncio.Future[Any]]]) -> None:
        self._under_way -= 1
        error = RuntimeError("the executor cancelled the task") if task.cancelled() else task.exception()
        # A waiter that gave up (its timeout, its client gone) was cancelled: its stream is answered 410 anyway.
        for _, future in group:
            if future.done():
                continue
            if error is None:
                future.set_result(task.result())
            else:
                future.set_exception(error)
        if self._waiting:
            self._send()


def _failed_if_interchange_gone(executor: HighThroughputExecutor) -> bool:
    """Whether ``executor`` failed; an interchange that exited fails it, and with it the tasks still waiting.

    Nothing restarts an interchange, and asking a dead one anything waits forever.
    """
    process = executor.interchange_proc
    if not executor.bad_state_is_set and process is not None and process.poll() is not None:
        executor.set_bad_state_and_fail_all(RuntimeError(f"its interchange exited with status {process.returncode}"))
    return bool(executor.bad_state_is_set)


def _waiting(jobs: Sequence[dict[str, Any]]) -> str:
    """Why the workers' job waits, in the scheduler's words when it gives them."""
    reasons = sorted({str(job["reason"]) for job in jobs if job.get("state") == "queued" and job.get("reason")})
    return f"the workers' job waits ({', '.join(reasons)})" if reasons else "the workers' job waits"


def _epoch(when: Any) -> float | None:
    """Epoch seconds of a scheduler's local ISO time."""
    if not isinstance(when, str):
        return None
    try:
        return float(time.mktime(time.strptime(when, "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, OverflowError):
        return None
