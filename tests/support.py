"""Real processes and servers on loopback ports for the tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml

from compute_functions.model_server import ModelServer
from gateway.cli import serve_command
from gateway.simulator import command as simulator_command

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
MODEL = "facebook/opt-125m"


@contextmanager
def simulator(*args: str, models: tuple[str, ...] = ("facebook/opt-125m",), port: int = 0) -> Iterator[ModelServer]:
    """A simulator process serving ``models``; extra ``args`` go to its command line."""
    server = ModelServer(simulator_command(*models, options=args), port=port)
    server.start(timeout=30)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def gateway(
    config: dict[str, Any],
    tmp_path: Path,
    *,
    token: str = TOKEN,
    env: dict[str, str] | None = None,
    log_level: str = "warning",
) -> Iterator[ModelServer]:
    """The gateway as a real ``inference-gateway serve`` process with ``config``."""
    config_file = tmp_path / f"gateway-{os.urandom(4).hex()}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    server = ModelServer(
        serve_command(config_file, log_level=log_level),
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


@contextmanager
def embedded_default(state: Path) -> Iterator[tuple[ModelServer, str]]:
    """``inference-gateway serve`` on its embedded default as a newcomer starts it (state in ``state``, a dev token
    of its own making), with that token as ``inference-gateway dev-token`` prints it."""
    env = {"INFERENCE_GATEWAY_STATE_DIR": str(state), "INFERENCE_GATEWAY_DEV_TOKEN": ""}
    server = ModelServer(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", "{port}"],
        health_path="/resource_server/health",
        env=env,
        log_path=state / "serve.log",
    )
    server.start(timeout=60)
    try:
        token = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "dev-token"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stdout.strip()
        yield server, token
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


def aborted(metrics_url: str) -> float:
    """Requests a vLLM (or the simulator) saw abandoned by their client, from its ``/metrics``."""
    lines = scrape(metrics_url).splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line
    )


class ScriptedBackend:
    """An OpenAI-compatible server whose answer is chosen by the request's model name.

    ``status-NNN`` answers that status with an OpenAI error body, ``not-json`` answers 200
    with a body that is not JSON, ``plain-stream`` answers a stream request with text/plain,
    ``crlf-stream`` and ``cr-stream`` stream with those line endings,
    and any other model gets a small valid answer. It records each request's headers and
    refuses requests without ``Authorization: Bearer <api_key>`` when ``api_key`` is set.
    """

    def __init__(self, api_key: str | None = None) -> None:
        import http.server
        import threading

        self.api_key = api_key
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                import json

                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                backend.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if backend.api_key and self.headers.get("authorization") != f"Bearer {backend.api_key}":
                    error = {
                        "error": {
                            "message": "Incorrect API key provided.",
                            "type": "invalid_request_error",
                            "code": "invalid_api_key",
                            "param": None,
                        }
                    }
                    self._send(401, json.dumps(error).encode())
                    return
                model = body.get("model", "")
                if model.startswith("status-"):
                    status = int(model.removeprefix("status-"))
                    error = {
                        "error": {
                            "message": f"scripted failure {status}",
                            "type": "scripted",
                            "code": f"scripted_{status}",
                            "param": None,
                        }
                    }
                    self._send(status, json.dumps(error).encode())
                elif model == "not-json":
                    self._send(200, b"<html>proxy error</html>", "text/html")
                elif model == "plain-stream":
                    self._send(200, b"hello", "text/plain")
                elif model in ("crlf-stream", "cr-stream"):
                    # Allowed by the SSE standard: CRLF or CR line endings, comments, an event's data over two
                    # lines (joined with LF, which JSON takes as white space), and a usage-only last chunk.
                    newline = "\r\n" if model == "crlf-stream" else "\r"
                    events = [": the model is warm", 'data: {"id": "x", "object": "chat.completion.chunk",']
                    for index, word in enumerate(["Hello", " world"]):
                        delta = {"content": word} if index else {"role": "assistant", "content": word}
                        choice = {"index": 0, "delta": delta, "finish_reason": "stop" if index else None}
                        events[-1] += f'\ndata: "created": 0, "model": "{model}", "choices": [{json.dumps(choice)}]}}'
                        events.append('data: {"id": "x", "object": "chat.completion.chunk",')
                    usage = json.dumps({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
                    events[-1] += f'\ndata: "created": 0, "model": "{model}", "choices": [], "usage": {usage}}}'
                    events.append("data: [DONE]")
                    text = "".join(event.replace("\n", newline) + newline * 2 for event in events)
                    self._send(200, text.encode(), "text/event-stream")
                elif body.get("stream"):
                    chunk = {
                        "id": "x",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
                    }
                    self._send(200, f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")
                else:
                    answer = {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": model,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                    self._send(200, json.dumps(answer).encode())

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedBackend:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def forget_redis_keys(url: str, prefix: str) -> None:
    """Delete what a test left in Redis under its own ``prefix``: some keys, such as the relay's secret, never
    expire."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def stop_model_servers(state_dir: Path) -> None:
    """Stop every model server the compute functions started with ``state_dir``, through its watchdog."""
    watchdogs = []
    for state_file in state_dir.glob("*.json"):
        pid = json.loads(state_file.read_text()).get("watchdog")
        if isinstance(pid, int):
            watchdogs.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while watchdogs and time.monotonic() < deadline:
        watchdogs = [pid for pid in watchdogs if not _gone(pid)]
        time.sleep(0.1)
    assert not watchdogs, f"model server watchdogs still running: {watchdogs}"


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
