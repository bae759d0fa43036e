"""Batch jobs and the files they read and write: the usage guide's routes and the OpenAI Batches and Files APIs."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from compute_functions.batch import ERRORS, RESULTS
from gateway.api.responses import Handler, api_handler, authenticate, json_response, read_json
from gateway.batches.service import Batches, open_nofollow
from gateway.errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from gateway.runtime import Runtime
from gateway.storage.database import DatabaseUnavailable

_CHUNK = 256 * 1024
# Room for the multipart framing and the small fields around an upload's content.
_FORM_OVERHEAD = 64 * 1024


def batch_handler(handler: Handler) -> Handler:
    """``api_handler``, with the batch database being down answered as 503 rather than as an internal error."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except DatabaseUnavailable as exc:
            raise ServiceUnavailable(
                f"The batch database cannot be reached now ({exc}); try again shortly.", code="database_unavailable"
            ) from None

    return api_handler(wrapped)


def _batches(request: Request) -> Batches:
    runtime: Runtime = request.app.state.runtime
    return runtime.batches


@batch_handler
async def create_batch(request: Request) -> Response:
    batches = _batches(request)
    identity = await authenticate(request)
    server = batches.config.server
    body = await read_json(request, server.max_body_bytes, server.max_json_depth)
    params = request.path_params
    job = await batches.submit(identity, body, params.get("cluster"), params.get("framework"))
    return json_response(job.view())


@batch_handler
async def list_batches(request: Request) -> Response:
    batches = _batches(request)
    identity = await authenticate(request)
    query = request.query_params
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequest("'limit' must be a number from 1 to 100.", param="limit")
    jobs = await batches.list(identity, query.get("status"), query.get("after"), int(raw_limit) + 1)
    page = jobs[: int(raw_limit)]
    return json_response(
        {
            "object": "list",
            "data": [job.view() for job in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(jobs) > len(page),
        }
    )


@batch_handler
async def get_batch(request: Request) -> Response:
    batches = _batches(request)
    identity = await authenticate(request)
    job = await batches.get(identity, request.path_params["batch_id"])
    return json_response(job.view())


@batch_handler
async def cancel_batch(request: Request) -> Response:
    batches = _batches(request)
    identity = await authenticate(request)
    job = await batches.cancel(identity, request.path_params["batch_id"])
    return json_response(job.view())


@batch_handler
async def batch_result(request: Request) -> Response:
    """The batch's results file as written so far (``?file=errors``: its errors file), as JSON lines."""
    batches = _batches(request)
    identity = await authenticate(request)
    job = await batches.get(identity, request.path_params["batch_id"])
    which = request.query_params.get("file", "results")
    if which not in ("results", "errors"):
        raise InvalidRequest("'file' must be results or errors.", param="file")
    if not batches.readable(job):
        raise NotFound(
            f"The results of batch '{job.id}' are on cluster {job.cluster}, in {job.folder}.", code="results_not_here"
        )
    return _file_response(job.folder / (RESULTS if which == "results" else ERRORS))


def _file_response(path: str | Path) -> Response:
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        return Response(b"", media_type="application/jsonl")
    except OSError as exc:
        raise NotFound(f"The file cannot be read: {exc.strerror}.", code="file_not_readable") from None

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while data := await asyncio.to_thread(os.read, fd, _CHUNK):
                yield data
        finally:
            os.close(fd)

    return StreamingResponse(chunks(), media_type="application/jsonl")


async def _limited(request: Request, limit: int) -> AsyncGenerator[bytes]:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The upload is larger than the limit of {limit - _FORM_OVERHEAD} bytes.")
        yield chunk


@batch_handler
async def upload_file(request: Request) -> Response:
    """``POST /v1/files`` with ``purpose=batch`` and a JSONL ``file``, as the ``openai`` SDK sends it."""
    batches = _batches(request)
    identity = await authenticate(request)
    limit = batches.settings.max_upload_bytes + _FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The upload is larger than the limit of {batches.settings.max_upload_bytes} bytes.")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("Send the file as multipart/form-data with fields 'purpose' and 'file'.")
    parser = MultiPartParser(request.headers, _limited(request, limit), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"The upload is not valid multipart/form-data: {exc}.") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise InvalidRequest("Only files with purpose 'batch' are accepted.", param="purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("The form has no 'file'.", param="file", code="missing_required_parameter")
        size = upload.size or 0
        if size > batches.settings.max_upload_bytes:
            raise PayloadTooLarge(f"The upload is larger than the limit of {batches.settings.max_upload_bytes} bytes.")
        # The name is only shown back; one PostgreSQL could not store (a NUL byte) is dropped rather than refused.
        filename = (upload.filename or "").replace("\0", "") or "input.jsonl"
        stored = await batches.upload(identity, filename, upload.file, size)
    finally:
        await form.close()
    return json_response(stored.view())


@batch_handler
async def get_file(request: Request) -> Response:
    batches = _batches(request)
    identity = await authenticate(request)
    stored = await batches.file(identity, request.path_params["file_id"])
    return json_response(stored.view())


@batch_handler
async def delete_file(request: Request) -> Response:
    """``DELETE /v1/files/{id}``, as ``client.files.delete`` sends it."""
    batches = _batches(request)
    identity = await authenticate(request)
    file_id = request.path_params["file_id"]
    await batches.delete_file(identity, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


@batch_handler
async def file_content(request: Request) -> Response:
    batches = _batches(request)
    identity = await authenticate(request)
    stored = await batches.file(identity, request.path_params["file_id"])
    return _file_response(stored.path)
