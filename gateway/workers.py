"""Several serving processes on one machine: ``inference-gateway serve --workers N``.

uvicorn starts the processes on one listening socket; each builds its own gateway from the same configuration. They
share what replicas share: the database (usage, batches through their leases) and, through Redis, the rate limits
and the stream relay. A setting that keeps such state inside one process is refused before anything starts.
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.auth.dev import dev_token
from gateway.config import GatewayConfig, load_config
from gateway.front_door import protocol
from gateway.limits import build_limiter
from gateway.observability.logs import configure_logging

# How the first process hands its command line to the ones uvicorn starts (fresh interpreters, not forks).
_CONFIG = "INFERENCE_GATEWAY_SERVE_CONFIG"
_RELAY_URL = "INFERENCE_GATEWAY_SERVE_RELAY_URL"
_LOG_LEVEL = "INFERENCE_GATEWAY_SERVE_LOG_LEVEL"


def unshareable(config: GatewayConfig) -> list[str]:
    """What keeps state in one process, each with the setting that shares it; empty when N processes may serve."""
    problems = []
    limits = config.limits
    if not limits.resolved_redis_url() and build_limiter(limits).enabled:
        problems.append(
            f"rate limits would be counted by each process on its own: set limits.redis_url (or {limits.redis_url_env})"
        )
    relay = config.relay
    pushed = sorted({settings.transport for settings in config.endpoints if settings.transport in ("parsl", "globus")})
    if pushed and not relay.resolved_redis_url():
        problems.append(
            f"streams of {' and '.join(pushed)} endpoints are pushed back to whichever process the worker reaches: "
            f"set relay.redis_url (or {relay.redis_url_env})"
        )
    if "parsl" in pushed:
        problems.append(
            "a parsl endpoint's executor and its workers belong to one gateway process: serve it with --workers 1, "
            "or run its workers under a globus endpoint"
        )
    if config.model_servers:
        problems.append(
            "each process would start the model_servers on the same ports: start them on their own and give the "
            "endpoints their base_url"
        )
    return problems


def serve(config_path: str | None, config: GatewayConfig, workers: int, log_level: str, **options: Any) -> None:
    """Run ``workers`` serving processes of the gateway configured by ``config_path`` (already read as ``config``)."""
    if "dev" in config.auth.providers:
        # Made once here: processes starting together would each write a token of their own.
        dev_token(config.state_dir(), config.auth.dev.token_env, create=True)
    os.environ[_CONFIG] = config_path or ""
    os.environ[_RELAY_URL] = config.relay.url or ""
    os.environ[_LOG_LEVEL] = log_level
    uvicorn.run("gateway.workers:create_worker_app", factory=True, workers=workers, log_level=log_level, **options)


def create_worker_app() -> Starlette:
    """The gateway of one serving process, built from what ``serve`` handed down."""
    config = load_config(os.environ[_CONFIG] or None)
    config.relay.url = config.relay.url or os.environ[_RELAY_URL]
    configure_logging(config.logging, os.environ[_LOG_LEVEL])
    # uvicorn loads the application before its process accepts connections: the bounds hold from the first one.
    protocol(config.server)
    return create_app(config)
