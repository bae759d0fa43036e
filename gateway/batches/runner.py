"""Running batch jobs: one task per batch sends ``run_batch`` slices through the endpoint's transport until done.

The worker does the work and keeps the truth (``progress.json`` in the batch's folder); the gateway keeps the
database row in step with it. A slice lasts about ``batches.slice_seconds``; between slices the gateway notices a
cancel, an expiry or a lost worker. On ``parsl`` and ``globus`` endpoints the slice runs as the registered compute
function ``batch``; on ``direct`` endpoints it runs in a child process of the gateway (``python -m
compute_functions.batch``) that talks to the endpoint's base URL. Either way it is the same function.

Where the gateway shares the workers' filesystem (``direct`` and ``parsl``) it also reads the progress record
between slices and writes the cancel flag the worker watches; on ``globus`` endpoints it learns the counts when
each slice ends and a cancel takes effect at the end of the running slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson

from compute_functions.batch import ERRORS, RESULTS, read_progress, request_cancel
from gateway.batches.jobs import BatchJob, StoredFile
from gateway.batches.store import BatchStore
from gateway.config import GatewayConfig
from gateway.dispatch.base import Dispatcher
from gateway.federation.registry import Endpoint, Registry

log = logging.getLogger("gateway.batches")

# A worker that cannot take the batch's lock waits this long before it reports the batch busy.
_LOCK_WAIT = 30.0
# Beyond the slice and the lock: the last requests of the slice, the model server's start, the transport.
_SLICE_MARGIN = 120.0
_OFFLINE_LIMIT = 24 * 3600.0
_BUSY_PAUSE = 2.0


class RunsComputeFunctions(Protocol):
    async def run(
        self, endpoint: Endpoint, function: str, request: dict[str, Any], limit: float | None = None
    ) -> Any: ...


@runtime_checkable
class LaunchesModelServers(Protocol):
    def model_server(self, endpoint: Endpoint) -> dict[str, Any]: ...


def shares_files(endpoint: Endpoint) -> bool:
    """Whether the gateway sees the files the endpoint's workers see: its own workers, or its own process."""
    return endpoint.transport != "globus"


def new_id(prefix: str) -> str:
    return f"{prefix}{os.urandom(12).hex()}"


class BatchRunner:
    """Runs the batches the gateway holds: at most ``max_running`` at once, each resumed where it stood."""

    def __init__(
        self,
        config: GatewayConfig,
        store: BatchStore,
        registry: Registry,
        dispatcher_of: Callable[[Endpoint], Dispatcher],
        roots_of: Callable[[BatchJob], list[str]],
        state_dir: Path,
    ) -> None:
        self.config = config
        self.settings = config.batches
        self.store = store
        self.registry = registry
        self._dispatcher_of = dispatcher_of
        self._roots_of = roots_of
        self._log_dir = state_dir / "logs"
        self._slots = asyncio.Semaphore(self.settings.max_running)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        # Batches with a slice out now, as the drive loop last read them.
        self.slicing: dict[str, BatchJob] = {}
        self._children: set[asyncio.subprocess.Process] = set()
        self._background: list[asyncio.Task[None]] = []
        # Who holds a lease, as operators read it in the database: this machine and process.
        self.owner = f"{socket.gethostname()[:80]}:{os.getpid()}:{os.urandom(4).hex()}"

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._background = [
            asyncio.create_task(self._hold(), name="batches-leases"),
            asyncio.create_task(self._poll(), name="batches-poll"),
        ]

    async def close(self) -> None:
        tasks = [*self._background, *self._tasks.values()]
        for task in tasks:
            task.cancel()
        for child in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------ leases

    def lease(self, job: BatchJob) -> None:
        """Mark ``job`` as held by this replica, before it is first written."""
        job.lease_owner, job.lease_expires_at = self.owner, time.time() + self.settings.lease_seconds

    def held_elsewhere(self, job: BatchJob) -> bool:
        """Whether another replica holds a live lease on ``job``."""
        return (
            job.lease_owner is not None
            and job.lease_owner != self.owner
            and (job.lease_expires_at or 0.0) > time.time()
        )

    async def _hold(self) -> None:
        """Keep the leases of the batches this replica runs, and take up the ones no live replica holds (those of
        a gateway that stopped or died, and new ones) while there is room; the workers skip the lines already
        answered."""
        seconds = self.settings.lease_seconds
        migrated = False
        while True:
            try:
                if not migrated:
                    await self.store.database.migrate()
                    migrated = True
                held = list(self._tasks)
                kept = await self.store.renew(self.owner, held, seconds)
                for batch_id in held:
                    task = self._tasks.get(batch_id)
                    if batch_id not in kept and task is not None:
                        # Not renewed in time (the database was out of reach): another replica may run it now.
                        log.warning("batch %s: its lease lapsed; leaving it to the replica that holds it", batch_id)
                        task.cancel()
                    elif kept.get(batch_id) == "cancelling" and batch_id in self._wake:
                        # Cancelled through another replica: end a pause between slices now.
                        self._wake[batch_id].set()
                room = self.settings.max_running - len(self._tasks)
                if room > 0:
                    claimed = await self.store.claim(self.owner, seconds, room)
                    if claimed:
                        log.info("taking up %d batches: %s", len(claimed), ", ".join(claimed))
                    for batch_id in claimed:
                        self.schedule(batch_id)
            except Exception as exc:
                log.warning("cannot claim or renew batch leases: %s", exc)
            await asyncio.sleep(seconds / 4)

    def schedule(self, batch_id: str) -> None:
        if batch_id in self._tasks:
            return
        task = asyncio.create_task(self._drive(batch_id), name=f"batch-{batch_id}")
        self._tasks[batch_id] = task
        self._wake[batch_id] = asyncio.Event()

        def forget(_: asyncio.Task[None]) -> None:
            self._tasks.pop(batch_id, None)
            self._wake.pop(batch_id, None)

        task.add_done_callback(forget)

    def endpoint_of(self, job: BatchJob) -> Endpoint | None:
        for endpoint in self.registry.endpoints:
            if (endpoint.cluster, endpoint.framework) == (job.cluster, job.framework) and job.model in endpoint.models:
                return endpoint
        return None

    # ------------------------------------------------------------------------------------------ control

    def cancel(self, job: BatchJob) -> bool:
        """Ask the batch's worker to stop; True when no slice runs, so the batch may be settled now."""
        endpoint = self.endpoint_of(job)
        if endpoint is not None and shares_files(endpoint):
            with contextlib.suppress(OSError):
                request_cancel(job.folder)
        wake = self._wake.get(job.id)
        if wake is not None:
            wake.set()
        return job.id not in self.slicing

    def progress(self, job: BatchJob) -> BatchJob:
        """``job`` with the counts its worker last recorded, when the gateway can read them and they are newer."""
        endpoint = self.endpoint_of(job)
        if not job.active or endpoint is None or not shares_files(endpoint):
            return job
        record = read_progress(job.folder)
        if record is None:
            return job
        job.total = record.get("total") if record.get("total") is not None else job.total
        job.completed = max(job.completed, int(record.get("completed") or 0))
        job.failed = max(job.failed, int(record.get("failed") or 0))
        return job

    async def _poll(self) -> None:
        """Keep the rows of running batches in step with their progress records, and stop batches that expire."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            now = time.time()
            for batch_id, job in list(self.slicing.items()):
                before = (job.total, job.completed, job.failed)
                try:
                    fresh = self.progress(job)
                    if (fresh.total, fresh.completed, fresh.failed) != before:
                        await self.store.update(
                            batch_id, total=fresh.total, completed=fresh.completed, failed=fresh.failed
                        )
                except Exception as exc:
                    log.warning("cannot record the progress of batch %s: %s", batch_id, exc)
                if now >= job.expires_at:
                    self.cancel(job)

    # ------------------------------------------------------------------------------------------ the drive loop

    async def _drive(self, batch_id: str) -> None:
        try:
            async with self._slots:
                while True:
                    try:
                        if not await self._step(batch_id):
                            return
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # The database, most likely; the worker's record keeps the truth meanwhile.
                        log.exception("batch %s: the gateway's loop failed; trying again shortly", batch_id)
                        await asyncio.sleep(self.settings.poll_interval * 5)
        finally:
            # Done, or this gateway stops: another replica may take the batch up at once, not a lease later.
            with contextlib.suppress(Exception):
                await self.store.release(self.owner, batch_id)

    async def _step(self, batch_id: str) -> bool:
        """Run one slice of the batch, or settle it; False once there is nothing left to do."""
        job = await self.store.get(batch_id)
        if job is None or not job.active:
            return False
        now = int(time.time())
        if job.status == "cancelling":
            await self.settle(job, "cancelled")
            return False
        if now >= job.expires_at:
            await self.settle(job, "expired")
            return False
        endpoint = self.endpoint_of(job)
        if endpoint is None:
            await self._fail(job, "endpoint_gone", f"{job.cluster}/{job.framework} no longer serves '{job.model}'.")
            return False
        if job.status in ("validating", "queued"):
            job.status, job.in_progress_at = "in_progress", now
            await self.store.update(job.id, status=job.status, in_progress_at=now)
        self.slicing[job.id] = job
        try:
            result = await self._slice(job, endpoint)
            failure = None if result.get("ok") else str((result.get("error") or {}).get("message") or result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            result, failure = {}, f"{exc.__class__.__name__}: {exc}"
        finally:
            self.slicing.pop(job.id, None)
        if failure is not None:
            return await self._retry(job, failure)
        return await self._apply(job, result)

    async def _apply(self, job: BatchJob, result: dict[str, Any]) -> bool:
        state = result.get("state")
        counts = {
            "total": result.get("total", job.total),
            "completed": int(result.get("completed") or job.completed),
            "failed": int(result.get("failed") or job.failed),
        }
        progressed = (counts["completed"], counts["failed"]) != (job.completed, job.failed)
        vars(job).update(counts)
        if state == "busy":
            # A worker from before a restart still holds the batch; it stops by itself.
            await self._pause(job, _BUSY_PAUSE)
            return True
        if state == "failed":
            errors = result.get("errors") or [{"code": "batch_failed", "message": "the worker refused the batch"}]
            await self._fail(job, errors[0]["code"], errors[0]["message"], errors=errors, **counts)
            return False
        if state == "completed":
            now = int(time.time())
            await self.store.update(job.id, status="finalizing", finalizing_at=now, **counts)
            files = await self._output_files(job)
            await self.store.update(job.id, status="completed", completed_at=int(time.time()), attempts=0, **files)
            log.info("batch %s completed: %d answered, %d failed", job.id, job.completed, job.failed)
            return False
        await self.store.update(job.id, attempts=0 if progressed else job.attempts, **counts)
        if state == "cancelled":
            current = await self.store.get(job.id)
            if current is not None and current.status != "cancelling" and time.time() >= job.expires_at:
                await self.settle(job, "expired")
            else:
                await self.settle(job, "cancelled")
            return False
        return True

    async def _retry(self, job: BatchJob, failure: str) -> bool:
        attempts = job.attempts + 1
        log.warning(
            "batch %s: slice failed (attempt %d of %d): %s", job.id, attempts, self.settings.max_attempts, failure
        )
        if attempts >= self.settings.max_attempts:
            await self._fail(job, "worker_failed", f"The batch's worker failed {attempts} times; the last: {failure}")
            return False
        await self.store.update(job.id, attempts=attempts)
        await self._pause(job, min(2.0**attempts, 60.0))
        return True

    async def _pause(self, job: BatchJob, seconds: float) -> None:
        wake = self._wake.get(job.id)
        if wake is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _fail(self, job: BatchJob, code: str, message: str, errors: Any = None, **counts: Any) -> None:
        log.warning("batch %s failed: %s", job.id, message)
        files = await self._output_files(job)
        await self.store.update(
            job.id,
            status="failed",
            failed_at=int(time.time()),
            errors=errors or [{"code": code, "message": message, "param": None, "line": None}],
            **files,
            **counts,
        )

    async def settle(self, job: BatchJob, status: str) -> None:
        """End a cancelled or expired batch; what it answered so far stays in its files."""
        self.cancel(job)
        fresh = self.progress(job)
        files = await self._output_files(job)
        await self.store.update(
            job.id,
            status=status,
            total=fresh.total,
            completed=fresh.completed,
            failed=fresh.failed,
            **{f"{status}_at": int(time.time())},
            **files,
        )
        log.info("batch %s %s", job.id, status)

    async def _output_files(self, job: BatchJob) -> dict[str, str]:
        """File ids for the batch's results and errors files, for the Files API; none for files the gateway
        cannot see or that are empty."""
        endpoint = self.endpoint_of(job)
        if endpoint is None or not shares_files(endpoint):
            return {}
        found: dict[str, str] = {}
        now = int(time.time())
        for column, name, purpose in (
            ("output_file_id", RESULTS, "batch_output"),
            ("error_file_id", ERRORS, "batch_error"),
        ):
            if getattr(job, column):
                continue
            path = job.folder / name
            try:
                size = path.lstat().st_size
            except OSError:
                continue
            if size == 0 or path.is_symlink():
                continue
            stored = StoredFile(new_id("file-"), job.username, purpose, f"{job.id}_{name}", size, str(path), now)
            await self.store.add_file(stored)
            found[column] = stored.id
        return found

    # ------------------------------------------------------------------------------------------ one slice

    def _request(self, job: BatchJob, endpoint: Endpoint) -> dict[str, Any]:
        settings = self.settings
        return {
            "batch_id": job.id,
            "input": job.input_file_path,
            "output": str(job.folder),
            "allowed_roots": self._roots_of(job),
            "model": job.model,
            "backend_model": endpoint.backend_model(job.model),
            "endpoint": job.endpoint,
            "max_lines": settings.max_lines,
            "max_line_bytes": settings.max_line_bytes,
            "concurrency": settings.concurrency,
            "time_budget": settings.slice_seconds,
            "timeout": self.config.server.request_timeout,
            "lock_wait": _LOCK_WAIT,
        }

    async def _slice(self, job: BatchJob, endpoint: Endpoint) -> dict[str, Any]:
        request = self._request(job, endpoint)
        limit = self.settings.slice_seconds + _LOCK_WAIT + self.config.server.request_timeout + _SLICE_MARGIN
        if endpoint.transport == "direct":
            request["base_url"] = endpoint.base_url
            key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
            request["headers"] = {"authorization": f"Bearer {key}"} if key else {}
            return await self._run_here(job, request, limit)
        dispatcher = self._dispatcher_of(endpoint)
        if isinstance(dispatcher, LaunchesModelServers):
            request["model_server"] = dispatcher.model_server(endpoint)
        else:
            request["model_server"] = endpoint.worker_model_server
        launch = request["model_server"] or {}
        limit += float(launch.get("startup_timeout") or 0.0)
        cluster = self.settings.clusters.get(endpoint.cluster)
        if cluster is not None and cluster.offline_runner is not None:
            request["offline_runner"] = cluster.offline_runner.model_dump()
            limit = _OFFLINE_LIMIT
        runs: RunsComputeFunctions = dispatcher  # type: ignore[assignment]
        result = await runs.run(endpoint, "batch", request, limit)
        if not isinstance(result, dict):
            raise RuntimeError(f"the batch function returned {type(result).__name__}, not its result")
        return result

    async def _run_here(self, job: BatchJob, request: dict[str, Any], limit: float) -> dict[str, Any]:
        """One slice in a child process: the gateway's event loop keeps its CPU for the requests it serves."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"batch-{job.id}.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "compute_functions.batch",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)
        self._children.add(child)
        try:
            async with asyncio.timeout(limit):
                out, _ = await child.communicate(orjson.dumps(request))
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            raise
        finally:
            self._children.discard(child)
        if child.returncode != 0:
            raise RuntimeError(f"the batch process exited with status {child.returncode}; see {log_path}")
        result = orjson.loads(out)
        if not isinstance(result, dict):
            raise RuntimeError("the batch process returned something other than its result")
        return result
