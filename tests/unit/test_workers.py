"""What ``serve --workers N`` refuses to share, and the setting each refusal names."""

from __future__ import annotations

from typing import Any

from gateway.config import GatewayConfig
from gateway.workers import unshareable

DIRECT = {"cluster": "local", "framework": "vllm", "models": ["m"], "base_url": "http://127.0.0.1:9/v1"}
LAUNCH = {"command": ["vllm", "serve", "{model}", "--port", "{port}"]}


def problems(**config: Any) -> list[str]:
    return unshareable(GatewayConfig.model_validate({"endpoints": [DIRECT], **config}))


def test_direct_endpoints_without_limits_share_everything() -> None:
    assert problems() == []
    assert problems(limits={"redis_url": "redis://r:6379/0", "defaults": {"requests_per_second": 5}}) == []


def test_in_process_limits_name_the_redis_setting() -> None:
    (refused,) = problems(limits={"defaults": {"concurrent_requests": 2}})
    assert "set limits.redis_url (or INFERENCE_GATEWAY_LIMITS_REDIS_URL)" in refused


def test_parsl_endpoints_need_the_redis_relay_and_one_process() -> None:
    parsl = {
        "cluster": "hpc",
        "framework": "vllm",
        "models": ["m"],
        "transport": "parsl",
        "worker_model_server": LAUNCH,
    }
    relay, executor = problems(endpoints=[parsl])
    assert "set relay.redis_url (or INFERENCE_GATEWAY_RELAY_REDIS_URL)" in relay
    assert "--workers 1" in executor
    (executor,) = problems(endpoints=[parsl], relay={"redis_url": "redis://r:6379/0"})
    assert "--workers 1" in executor


def test_model_servers_started_by_the_gateway_are_refused() -> None:
    started = {**DIRECT, "base_url": None, "model_server": "sim"}
    (refused,) = problems(endpoints=[started], model_servers=[{"name": "sim", "command": ["sim", "--port", "1"]}])
    assert "model_servers" in refused and "base_url" in refused
