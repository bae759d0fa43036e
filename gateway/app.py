"""The gateway's ASGI application and its one route table."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from gateway.accounting.record import SCOPE_KEY, RequestRecord, request_id
from gateway.api import admin, batches, catalog, downloads, identity, inference, monitoring, openapi, status, streams
from gateway.config import GatewayConfig, load_config
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, error_response
from gateway.front_door import UpgradesAnsweredAsHttp
from gateway.observability.middleware import ObservingMiddleware
from gateway.runtime import Runtime
from gateway.streaming.channels import CHANNEL_PATH

CLUSTER = "/resource_server/{cluster}/{framework}/v1"

ROUTES = [
    Route("/resource_server/v1/chat/completions", inference.chat_completions, methods=["POST"]),
    Route("/resource_server/v1/completions", inference.completions, methods=["POST"]),
    Route("/resource_server/v1/embeddings", inference.embeddings, methods=["POST"]),
    Route("/resource_server/v1/responses", inference.responses, methods=["POST"]),
    Route("/resource_server/v1/messages", inference.messages, methods=["POST"]),
    Route("/resource_server/v1/messages/count_tokens", inference.count_tokens, methods=["POST"]),
    Route("/resource_server/v1/rerank", inference.rerank, methods=["POST"]),
    Route("/resource_server/v1/score", inference.score, methods=["POST"]),
    Route("/resource_server/v1/tokenize", inference.tokenize, methods=["POST"]),
    Route("/resource_server/v1/detokenize", inference.detokenize, methods=["POST"]),
    Route("/resource_server/v1/models", catalog.list_models, methods=["GET"]),
    Route(f"{CLUSTER}/chat/completions", inference.chat_completions, methods=["POST"]),
    Route(f"{CLUSTER}/completions", inference.completions, methods=["POST"]),
    Route(f"{CLUSTER}/embeddings", inference.embeddings, methods=["POST"]),
    Route(f"{CLUSTER}/responses", inference.responses, methods=["POST"]),
    Route(f"{CLUSTER}/messages", inference.messages, methods=["POST"]),
    Route(f"{CLUSTER}/messages/count_tokens", inference.count_tokens, methods=["POST"]),
    Route(f"{CLUSTER}/rerank", inference.rerank, methods=["POST"]),
    Route(f"{CLUSTER}/score", inference.score, methods=["POST"]),
    Route(f"{CLUSTER}/tokenize", inference.tokenize, methods=["POST"]),
    Route(f"{CLUSTER}/detokenize", inference.detokenize, methods=["POST"]),
    Route("/resource_server/v1/batches", batches.create_batch, methods=["POST"]),
    Route("/resource_server/v1/batches", batches.list_batches, methods=["GET"]),
    Route("/resource_server/v1/batches/{batch_id}", batches.get_batch, methods=["GET"]),
    Route("/resource_server/v1/batches/{batch_id}/cancel", batches.cancel_batch, methods=["POST"]),
    Route("/resource_server/v1/batches/{batch_id}/result", batches.batch_result, methods=["GET"]),
    Route("/resource_server/v1/files", batches.upload_file, methods=["POST"]),
    Route("/resource_server/v1/files/{file_id}", batches.get_file, methods=["GET"]),
    Route("/resource_server/v1/files/{file_id}", batches.delete_file, methods=["DELETE"]),
    Route("/resource_server/v1/files/{file_id}/content", batches.file_content, methods=["GET"]),
    Route(f"{CLUSTER}/batches", batches.create_batch, methods=["POST"]),
    Route(f"{CLUSTER}/batches", batches.list_batches, methods=["GET"]),
    Route(f"{CLUSTER}/batches/{{batch_id}}", batches.get_batch, methods=["GET"]),
    Route(f"{CLUSTER}/batches/{{batch_id}}/cancel", batches.cancel_batch, methods=["POST"]),
    Route(f"{CLUSTER}/batches/{{batch_id}}/result", batches.batch_result, methods=["GET"]),
    Route(f"{CLUSTER}/files", batches.upload_file, methods=["POST"]),
    Route(f"{CLUSTER}/files/{{file_id}}", batches.get_file, methods=["GET"]),
    Route(f"{CLUSTER}/files/{{file_id}}", batches.delete_file, methods=["DELETE"]),
    Route(f"{CLUSTER}/files/{{file_id}}/content", batches.file_content, methods=["GET"]),
    Route("/resource_server/list-endpoints", catalog.list_endpoints, methods=["GET"]),
    Route("/resource_server/health", catalog.health, methods=["GET"]),
    Route("/resource_server/openapi.json", openapi.openapi, methods=["GET"]),
    Route("/resource_server/ready", monitoring.ready, methods=["GET"]),
    Route("/resource_server/admin/usage", admin.usage, methods=["GET"]),
    Route("/metrics", monitoring.metrics, methods=["GET"]),
    Route("/resource_server/whoami", identity.whoami, methods=["GET"]),
    Route("/resource_server/inference-auth-token.py", downloads.token_command, methods=["GET"]),
    Route("/resource_server/", status.status, methods=["GET"]),
    Route("/resource_server/status", status.status, methods=["GET"]),
    Route("/resource_server/activity", status.activity, methods=["GET"]),
    Route("/resource_server/usage", admin.own_usage, methods=["GET"]),
    Route("/resource_server/login", status.sign_in, methods=["POST"]),
    Route("/resource_server/{cluster}/models", catalog.cluster_models, methods=["GET"]),
    Route("/resource_server/{cluster}/jobs", catalog.cluster_jobs, methods=["GET"]),
    Route("/resource_server/internal/streams/{stream_id}", streams.receive_stream, methods=["POST"]),
    WebSocketRoute(CHANNEL_PATH + "/{channel_id}", streams.node_channel),
]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    elif exc.status_code == 404:
        error = NotFound(
            f"No route {request.url.path}; the API lives under /resource_server/v1/.", code="route_not_found"
        )
    else:
        error = GatewayError(str(exc.detail), status=exc.status_code, code="http_error")
    record: RequestRecord | None = request.scope.get(SCOPE_KEY)
    if record is not None:
        record.answered(error.status, error.code)
    return error_response(error, request_id(request))


def create_app(config: GatewayConfig | None = None) -> Starlette:
    """Build the gateway from ``config`` (the embedded default when None)."""
    runtime = Runtime(config or load_config())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
        middleware=[
            Middleware(UpgradesAnsweredAsHttp, websocket_prefixes=(CHANNEL_PATH + "/",)),
            # Without a usage writer nothing reads the finished records, and requests skip the middleware.
            *(
                [Middleware(ObservingMiddleware, ledger=runtime.ledger, metrics=runtime.metrics)]
                if runtime.ledger is not None
                else []
            ),
        ],
    )
    app.state.runtime = runtime
    return app
