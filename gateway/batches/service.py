"""What the API asks of batches: submit, look up, list, cancel, and the files of the OpenAI Files API."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

from compute_functions.batch import BatchRefused, checked_path, count_lines
from gateway.auth.base import Identity
from gateway.batches.jobs import ENDPOINTS, STATUSES, BatchJob, StoredFile
from gateway.batches.runner import BatchRunner, new_id, shares_files
from gateway.batches.store import BatchStore
from gateway.config import GatewayConfig
from gateway.dispatch.base import Dispatcher
from gateway.errors import InvalidRequest, NotFound, RateLimited
from gateway.federation.registry import Endpoint, Registry
from gateway.federation.selection import plan
from gateway.storage.database import Database, DatabaseUnavailable

log = logging.getLogger("gateway.batches")

_WINDOW = re.compile(r"^[1-9][0-9]*h$")
_MAX_METADATA = 16


def _text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name, code="invalid_type")
    if value is not None and "\0" in value:
        # No path may hold one, and PostgreSQL keeps no text that does.
        raise InvalidRequest(f"'{name}' contains a NUL byte.", param=name)
    return value


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _MAX_METADATA:
        raise InvalidRequest(f"'metadata' must be an object of at most {_MAX_METADATA} keys.", param="metadata")
    if not all(isinstance(key, str) and isinstance(item, str) for key, item in value.items()):
        raise InvalidRequest("'metadata' keys and values must be strings.", param="metadata")
    if any("\0" in key or "\0" in item for key, item in value.items()):
        raise InvalidRequest("'metadata' keys and values cannot contain a NUL byte.", param="metadata")
    return value


def _refused(refused: BatchRefused, param: str) -> InvalidRequest:
    return InvalidRequest(refused.message, code=refused.code, param=param)


def _first_model(path: Path) -> str | None:
    """The model named by the first request line of an input file (the Files API's batches name none)."""
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
            body = item.get("body", item) if isinstance(item, dict) else None
            model = body.get("model") if isinstance(body, dict) else None
            return model if isinstance(model, str) else None
    return None


def runs_batches(endpoint: Endpoint) -> bool:
    """Whether ``endpoint`` has a way to run the batch function: its own workers, or a registered function id."""
    if endpoint.transport != "globus":
        return True
    ids = endpoint.globus.function_ids if endpoint.globus is not None else None
    return ids is not None and ids.batch is not None


class Batches:
    """The gateway's batch jobs; ``runner`` runs them."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Registry,
        dispatcher_of: Callable[[Endpoint], Dispatcher],
        database: Database,
        state_dir: Path,
    ) -> None:
        self.config = config
        self.settings = config.batches
        self.registry = registry
        self.store = BatchStore(database)
        # Relative roots are taken from the folder the gateway was started in.
        self.base = Path.cwd()
        self.files_dir = state_dir / "files"
        self.batches_dir = state_dir / "batches"
        self.runner = BatchRunner(config, self.store, registry, dispatcher_of, self.roots_of, state_dir)

    async def start(self) -> None:
        try:
            # Before the first request: a batch submitted at once needs the tables.
            await self.store.database.migrate()
        except DatabaseUnavailable as exc:
            log.warning("batches wait for the database: %s", exc)
        await self.runner.start()

    async def close(self) -> None:
        await self.runner.close()

    # ------------------------------------------------------------------------------------------ paths

    def roots(self, cluster: str, username: str) -> list[str]:
        """The folders a user's batch files may be in on ``cluster``."""
        own = self.settings.clusters.get(cluster)
        configured = (
            own.allowed_roots if own is not None and own.allowed_roots is not None else self.settings.allowed_roots
        )
        roots = []
        for root in configured:
            if "{username}" in root:
                if not username or "/" in username or username in (".", ".."):
                    continue
                root = root.replace("{username}", username)
            path = Path(root).expanduser()
            roots.append(str(path if path.is_absolute() else self.base / path))
        return roots

    def roots_of(self, job: BatchJob) -> list[str]:
        return self._roots(job.cluster, job.username, uploaded=job.input_file_id is not None)

    def _roots(self, cluster: str, username: str, *, uploaded: bool) -> list[str]:
        # A batch of an uploaded file reads and writes only the gateway's own folders.
        return [str(self.files_dir), str(self.batches_dir)] if uploaded else self.roots(cluster, username)

    # ------------------------------------------------------------------------------------------ submit

    async def submit(self, identity: Identity, body: Any, cluster: str | None, framework: str | None) -> BatchJob:
        """A new batch from the usage guide's body (``input_file_path``, ``output_folder_path``, ``model``) or the
        OpenAI SDK's (``input_file_id``, ``endpoint``, ``completion_window``)."""
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        input_path = _text(body, "input_file_path") or _text(body, "input_file")
        input_file_id = _text(body, "input_file_id")
        if (input_path is None) == (input_file_id is None):
            raise InvalidRequest(
                "Give the input as 'input_file_path' (a path on the cluster) or 'input_file_id' (an uploaded file).",
                param="input_file_path",
                code="missing_required_parameter",
            )
        endpoint = _text(body, "endpoint")
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise InvalidRequest(f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        window = _text(body, "completion_window") or self.settings.completion_window
        if not _WINDOW.match(window):
            raise InvalidRequest(
                "'completion_window' must be a number of hours, such as '24h'.", param="completion_window"
            )
        metadata = _metadata(body.get("metadata"))
        output = _text(body, "output_folder_path")
        # Refused early without reading the input; the insert below decides, for every replica at once.
        if await self.store.active_count(identity.username) >= self.settings.max_active_per_user:
            raise self._too_many()
        stored = await self._uploaded(identity, input_file_id) if input_file_id is not None else None
        model = _text(body, "model")
        if model is None and stored is not None:
            model = await asyncio.to_thread(_first_model, Path(stored.path))
        if model is None and stored is not None:
            raise InvalidRequest(
                "'model' is required: neither the batch nor the first request line of the uploaded file names one. "
                "Give each line its model (in OpenAI's batch line, as 'body.model'), or pass 'model' with the batch "
                "(with the OpenAI SDK: extra_body={'model': ...}).",
                param="model",
                code="missing_required_parameter",
            )
        if model is None:
            raise InvalidRequest("'model' is required.", param="model", code="missing_required_parameter")
        chosen = self._endpoint(identity, model, cluster, framework, uploaded=stored is not None)
        if stored is not None:
            input_path, output = stored.path, str(self.batches_dir)
        if output is None:
            raise InvalidRequest(
                "'output_folder_path' is required.", param="output_folder_path", code="missing_required_parameter"
            )
        assert input_path is not None
        roots = self._roots(chosen.cluster, identity.username, uploaded=stored is not None)
        total: int | None = None
        source, folder = input_path, output
        if shares_files(chosen):
            source, folder, total = await asyncio.to_thread(self._check_files, input_path, output, roots)
        elif not (Path(input_path).is_absolute() and Path(output).is_absolute()):
            raise InvalidRequest("The input and output paths must be absolute.", param="input_file_path")
        now = int(time.time())
        job = BatchJob(
            id=new_id("batch_"),
            username=identity.username,
            status="queued" if total is not None else "validating",
            model=model,
            cluster=chosen.cluster,
            framework=chosen.framework,
            endpoint=endpoint,
            input_file_path=source,
            output_folder_path=folder,
            input_file_id=input_file_id,
            output_file_id=None,
            error_file_id=None,
            completion_window=window,
            user_metadata=metadata,
            errors=None,
            total=total,
            completed=0,
            failed=0,
            attempts=0,
            created_at=now,
            expires_at=now + int(window[:-1]) * 3600,
        )
        self.runner.lease(job)
        if not await self.store.add_within(job, self.settings.max_active_per_user):
            raise self._too_many()
        self.runner.schedule(job.id)
        return job

    def _too_many(self) -> RateLimited:
        return RateLimited(
            f"You have {self.settings.max_active_per_user} batches queued or running, the most allowed; "
            "wait for one to finish or cancel one.",
            code="too_many_active_batches",
        )

    def _endpoint(
        self, identity: Identity, model: str, cluster: str | None, framework: str | None, *, uploaded: bool
    ) -> Endpoint:
        """The endpoint that runs the whole batch: the best one now, as for a request."""
        candidates = [
            endpoint
            for endpoint in self.registry.candidates(model, identity, cluster, framework)
            if runs_batches(endpoint)
        ]
        if not candidates:
            raise InvalidRequest(
                f"No endpoint serving '{model}' can run batches: its Globus Compute endpoints have no registered "
                "batch function (inference-gateway register-functions).",
                param="model",
                code="batches_not_available",
            )
        if uploaded:
            candidates = [endpoint for endpoint in candidates if shares_files(endpoint)]
            if not candidates:
                raise InvalidRequest(
                    f"Model '{model}' runs only on endpoints whose workers cannot read files uploaded to the gateway; "
                    "give 'input_file_path' (a path on the cluster) instead.",
                    param="input_file_id",
                    code="upload_not_supported",
                )
        ordered = plan(candidates, model).endpoints
        return ordered[0] if ordered else candidates[0]

    def _check_files(self, input_path: str, output: str, roots: list[str]) -> tuple[str, str, int]:
        try:
            source = checked_path(input_path, roots, "input file", must_exist=True)
        except BatchRefused as refused:
            raise _refused(refused, "input_file_path") from None
        if not source.is_file():
            raise InvalidRequest(f"The input file '{input_path}' is not a regular file.", param="input_file_path")
        try:
            folder = checked_path(output, roots, "output folder", must_exist=False)
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)
            # Made through a path that resolved inside a root; check again what now stands there.
            folder = checked_path(output, roots, "output folder", must_exist=True)
        except BatchRefused as refused:
            raise _refused(refused, "output_folder_path") from None
        except OSError as exc:
            raise InvalidRequest(
                f"The output folder '{output}' cannot be made: {exc.strerror}.", param="output_folder_path"
            ) from None
        try:
            with open(source, "rb") as handle:
                total = count_lines(handle, self.settings.max_lines)
        except BatchRefused as refused:
            raise _refused(refused, "input_file_path") from None
        except OSError as exc:
            raise InvalidRequest(f"The input file cannot be read: {exc.strerror}.", param="input_file_path") from None
        if total == 0:
            raise InvalidRequest("The input file has no request lines.", param="input_file_path", code="empty_file")
        return str(source), str(folder), total

    # ------------------------------------------------------------------------------------------ look up

    async def get(self, identity: Identity, batch_id: str) -> BatchJob:
        """The caller's batch ``batch_id`` with its latest counts; 404 for a batch of anyone else."""
        # An id with a NUL byte names nothing, and PostgreSQL would refuse the query.
        job = None if "\0" in batch_id else await self.store.get(batch_id)
        if job is None or job.username != identity.username:
            raise NotFound(f"No batch '{batch_id}'.", code="batch_not_found", param="batch_id")
        return self.runner.progress(job)

    async def list(self, identity: Identity, status: str | None, after: str | None, limit: int) -> list[BatchJob]:
        if status is not None and status not in STATUSES:
            raise InvalidRequest(f"'status' must be one of {', '.join(STATUSES)}.", param="status")
        previous = await self.get(identity, after) if after else None
        jobs = await self.store.owned(identity.username, status=status, after=previous, limit=limit)
        return [self.runner.progress(job) for job in jobs]

    async def cancel(self, identity: Identity, batch_id: str) -> BatchJob:
        job = await self.get(identity, batch_id)
        if not job.active:
            raise InvalidRequest(
                f"Batch '{batch_id}' is {job.status} and cannot be cancelled.", code="batch_not_cancellable"
            )
        if job.status != "cancelling":
            job.status, job.cancelling_at = "cancelling", int(time.time())
            await self.store.update(job.id, status=job.status, cancelling_at=job.cancelling_at)
        if self.runner.cancel(job) and not self.runner.held_elsewhere(job):
            # No slice runs, so nothing is left to stop; a replica that holds the batch settles it itself.
            await self.runner.settle(job, "cancelled")
            return await self.get(identity, batch_id)
        return job

    def readable(self, job: BatchJob) -> bool:
        """Whether the gateway can read the batch's folder (not when it lies on a ``globus`` endpoint's cluster)."""
        endpoint = self.runner.endpoint_of(job)
        return endpoint is not None and shares_files(endpoint)

    # ------------------------------------------------------------------------------------------ files

    async def upload(self, identity: Identity, filename: str, source: IO[bytes], size: int) -> StoredFile:
        """Keep an uploaded batch input in the state folder."""
        file_id = new_id("file-")
        path = self.files_dir / f"{file_id}.jsonl"

        def copy() -> None:
            self.files_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            source.seek(0)
            with open(path, "xb") as target:
                shutil.copyfileobj(source, target, 1 << 20)

        await asyncio.to_thread(copy)
        stored = StoredFile(file_id, identity.username, "batch", filename, size, str(path), int(time.time()))
        try:
            await self.store.add_file(stored)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return stored

    async def file(self, identity: Identity, file_id: str) -> StoredFile:
        stored = None if "\0" in file_id else await self.store.file(file_id)
        if stored is None or stored.username != identity.username:
            raise NotFound(f"No file '{file_id}'.", code="file_not_found", param="file_id")
        return stored

    async def delete_file(self, identity: Identity, file_id: str) -> None:
        """Forget an upload or a finished batch's output file, and remove it from the state folder."""
        stored = await self.file(identity, file_id)
        reader = await self.store.active_reading(file_id)
        if reader is not None:
            raise InvalidRequest(
                f"File '{file_id}' is the input of batch '{reader}', which is not finished; cancel it first.",
                param="file_id",
                code="file_in_use",
            )
        await self.store.delete_file(file_id)
        # Uploads and the outputs of their batches are in the gateway's own folders and go with their rows; an
        # output file in a folder of the user's own stays where it is.
        folder = Path(stored.path).parent.resolve()
        if folder == self.files_dir.resolve() or folder.parent == self.batches_dir.resolve():
            await asyncio.to_thread(Path(stored.path).unlink, missing_ok=True)

    async def _uploaded(self, identity: Identity, file_id: str) -> StoredFile:
        stored = await self.file(identity, file_id)
        if stored.purpose != "batch":
            raise InvalidRequest(f"File '{file_id}' was not uploaded for batches.", param="input_file_id")
        return stored


def open_nofollow(path: str | Path) -> int:
    """A read descriptor for ``path`` that refuses a symbolic link in its last part."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
