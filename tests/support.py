"""Real processes and servers on loopback ports for the tests."""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from compute_functions.model_server import ModelServer

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"


@contextmanager
def simulator(*args: str, models: tuple[str, ...] = ("facebook/opt-125m",), port: int = 0) -> Iterator[ModelServer]:
    """A simulator process serving ``models``; extra ``args`` go to its command line."""
    command = ["{python}", "-m", "gateway.simulator", "--host", "{host}", "--port", "{port}"]
    for model in models:
        command += ["--model", model]
    server = ModelServer([*command, *args], port=port)
    server.start(timeout=30)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def gateway(
    config: dict[str, Any], tmp_path: Path, *, token: str = TOKEN, env: dict[str, str] | None = None
) -> Iterator[ModelServer]:
    """The gateway as a real ``inference-gateway serve`` process with ``config``."""
    config_file = tmp_path / f"gateway-{os.urandom(4).hex()}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    server = ModelServer(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--port",
            "{port}",
            "--config",
            str(config_file),
            "--log-level",
            "warning",
        ],
        health_path="/resource_server/health",
        env={
            "INFERENCE_GATEWAY_STATE_DIR": str(tmp_path / "state"),
            "INFERENCE_GATEWAY_DEV_TOKEN": token,
            **(env or {}),
        },
        log_path=tmp_path / f"{config_file.stem}.log",
    )
    server.start(timeout=60)
    try:
        yield server
    finally:
        server.stop()


def api_url(server: ModelServer) -> str:
    return f"http://{server.host}:{server.port}/resource_server/v1"


def direct_config(*endpoints: dict[str, Any], **server: Any) -> dict[str, Any]:
    return {"server": server, "auth": {"providers": ["dev"]}, "endpoints": list(endpoints)}


def endpoint(
    base_url: str, models: list[str] | None = None, cluster: str = "local", framework: str = "vllm", **extra: Any
) -> dict[str, Any]:
    return {
        "cluster": cluster,
        "framework": framework,
        "models": models or ["facebook/opt-125m"],
        "base_url": base_url,
        **extra,
    }


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def metric(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples in ``text``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total
