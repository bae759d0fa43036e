"""Against the real Globus Compute: runs only where a client identity and a running endpoint are available.

export GLOBUS_COMPUTE_CLIENT_ID=...                 # the identity the gateway submits tasks as
export GLOBUS_COMPUTE_CLIENT_SECRET=...
export INFERENCE_GATEWAY_LIVE_GLOBUS_ENDPOINT=...   # a running endpoint (e.g. endpoint_configs/globus-compute/local)
                                                    # whose workers can import compute_functions
# optional: the model server the workers start, as JSON worker_model_server settings (default: the simulator,
# which needs this repository installed in the workers' environment)
export INFERENCE_GATEWAY_LIVE_MODEL_SERVER='{"command": ["vllm", "serve", "{model}", "--port", "{port}"]}'
export INFERENCE_GATEWAY_LIVE_MODEL=facebook/opt-125m
.venv/bin/pytest tests/live/test_globus_compute_live.py

The compute functions are registered afresh for the run, as ``inference-gateway register-functions`` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import EndpointSettings
from gateway.dispatch.globus import GlobusDispatcher, sdk_client
from gateway.dispatch.registration import register_functions
from gateway.federation.registry import Endpoint
from gateway.simulator import command as simulator_command
from gateway.streaming.relay import LocalRelay

NEEDED = ("INFERENCE_GATEWAY_LIVE_GLOBUS_ENDPOINT", "GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET")
MISSING = [name for name in NEEDED if not os.environ.get(name)]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"live Globus Compute test: set {', '.join(MISSING)} to run it against a real Globus Compute endpoint",
)

MODEL = os.environ.get("INFERENCE_GATEWAY_LIVE_MODEL", "facebook/opt-125m")
SIMULATOR = {"command": simulator_command(MODEL)}


@pytest.fixture(scope="module")
def live_endpoint() -> Endpoint:
    function_ids = register_functions(sdk_client())
    launch: dict[str, Any] = json.loads(os.environ.get("INFERENCE_GATEWAY_LIVE_MODEL_SERVER") or json.dumps(SIMULATOR))
    settings = EndpointSettings.model_validate(
        {
            "cluster": "live",
            "framework": "globus",
            "models": [MODEL],
            "transport": "globus",
            "globus": {
                "endpoint_id": os.environ["INFERENCE_GATEWAY_LIVE_GLOBUS_ENDPOINT"],
                "function_ids": function_ids,
                "amqp_port": 443,
            },
            "worker_model_server": launch,
        }
    )
    return Endpoint.from_settings(settings, "")


@pytest.fixture
async def dispatcher() -> AsyncIterator[GlobusDispatcher]:
    live = GlobusDispatcher(relay=LocalRelay(secrets.token_bytes(32)), relay_url=None, request_timeout=600)
    await live.start()
    yield live
    await live.close()


async def test_the_endpoint_reports_online(dispatcher: GlobusDispatcher, live_endpoint: Endpoint) -> None:
    availability = await dispatcher.status(live_endpoint)

    assert availability.state != "offline", availability.detail


async def test_a_completion_runs_on_the_endpoint(dispatcher: GlobusDispatcher, live_endpoint: Endpoint) -> None:
    answer = await dispatcher.call(live_endpoint, "completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4})

    assert answer["object"] == "text_completion" and answer["choices"]


async def test_closing_stops_the_sdk_threads(live_endpoint: Endpoint) -> None:
    before = set(threading.enumerate())
    dispatcher = GlobusDispatcher(relay=LocalRelay(secrets.token_bytes(32)), relay_url=None, request_timeout=600)
    await dispatcher.start()
    await dispatcher.call(live_endpoint, "completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    await dispatcher.close()

    deadline = time.monotonic() + 30
    while [t for t in threading.enumerate() if t not in before and t.is_alive()] and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert [t.name for t in threading.enumerate() if t not in before] == []
