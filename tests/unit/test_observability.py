"""Metrics in the Prometheus text format and log lines as JSON, read back with their own parsers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.accounting.record import RequestRecord
from gateway.config import LimitSettings, LoggingSettings
from gateway.federation.registry import Endpoint, Registry
from gateway.limits.memory import MemoryRateLimiter
from gateway.observability.logs import AccessLog, JsonFormatter, current_scope
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.tally import Tally
from gateway.observability.writer import UsageWriter

ROUTE = "/resource_server/v1/chat/completions"


def served(model: str = "m", ttft: float | None = None, status: int = 200) -> RequestRecord:
    record = RequestRecord("POST", ROUTE, "10.0.0.1")
    record.route = ROUTE
    record.request_id, record.user, record.model, record.op = "rid-1", "alice", model, "chat/completions"
    record.cluster, record.framework, record.transport, record.status = "local", "vllm", "direct", status
    record.prompt_tokens, record.completion_tokens, record.duration, record.ttft = 5, 7, 0.3, ttft
    return record


def test_metrics_parse_with_prometheus_clients_own_parser() -> None:
    endpoint = Endpoint(
        cluster="local", framework="vllm", models=("m",), transport="direct", kind="vllm", base_url="http://x/v1"
    )
    # The usage writer process counts what it is handed and sends the counts to the gateway with its reports.
    writer = UsageWriter({"queue_size": 100})
    for reported in ([served(), served(ttft=0.02)], [served(status=429)]):
        counted = Tally()
        for record in reported:
            counted.observe(record.finished())
        writer.tally.merge(json.loads(json.dumps(counted.export())))
    metrics = GatewayMetrics(Registry([endpoint]), writer, MemoryRateLimiter(LimitSettings()), usage_log=False)
    families = {family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())}
    requests = {(s.labels["status"], s.labels["model"]): s.value for s in families["gateway_requests"].samples}
    assert requests == {("200", "m"): 2.0, ("429", "m"): 1.0}
    latency = {
        s.name: s.value
        for s in families["gateway_request_duration_seconds"].samples
        if s.labels.get("le") in (None, "0.25", "0.5")
    }
    assert latency["gateway_request_duration_seconds_count"] == 3
    assert latency["gateway_request_duration_seconds_sum"] == 0.3 * 3
    buckets = {
        s.labels["le"]: s.value
        for s in families["gateway_time_to_first_token_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert (buckets["0.01"], buckets["0.025"], buckets["+Inf"]) == (0.0, 1.0, 1.0)
    tokens = {s.labels["kind"]: s.value for s in families["gateway_tokens"].samples}
    assert tokens == {"prompt": 15.0, "completion": 21.0}
    states = {s.labels["state"]: s.value for s in families["gateway_endpoint_state"].samples}
    assert states == {"online": 1.0, "unreachable": 0.0}
    assert "process_cpu_seconds" in families


def test_log_records_are_json_with_the_request_id_and_no_bearer_token() -> None:
    formatter = JsonFormatter()
    token = current_scope.set({"request_id": "rid-42"})
    try:
        record = logging.LogRecord(
            "gateway.api", logging.WARNING, __file__, 1, "refused %s", ("Bearer s3cret-token",), None
        )
        line = json.loads(formatter.format(record))
    finally:
        current_scope.reset(token)
    assert line["level"] == "warning" and line["logger"] == "gateway.api" and line["request_id"] == "rid-42"
    assert "s3cret" not in line["message"] and line["message"] == "refused Bearer [redacted]"
    assert line["ts"].endswith("Z")


def test_the_access_log_is_one_json_line_per_request_and_prompts_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    quiet = AccessLog(LoggingSettings(), fd=fd)
    chatty = AccessLog(LoggingSettings.model_validate({"log_prompts": True}), fd=fd)
    record = served(ttft=0.0123)
    record.prompt = [{"role": "user", "content": "the secret plan"}]
    quiet.write(record.finished())
    chatty.write(record.finished())
    quiet.flush()
    chatty.flush()
    os.close(fd)
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["request_id"] == "rid-1" and first["status"] == 200 and first["user"] == "alice"
    assert first["prompt_tokens"] == 5 and first["completion_tokens"] == 7 and first["ttft_ms"] == 12.3
    assert "prompt" not in first
    assert second["prompt"] == [{"role": "user", "content": "the secret plan"}]


def test_the_access_log_can_be_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    text = AccessLog(LoggingSettings.model_validate({"json": False}), fd=fd)
    text.write(served().finished())
    text.flush()
    os.close(fd)
    line = path.read_text()
    assert " INFO gateway.access: POST /resource_server/v1/chat/completions 200 " in line
    assert "request_id=rid-1" in line


def test_recent_activity_keeps_an_hour_of_minutes_per_model() -> None:
    from gateway.observability.recent import RecentActivity

    tally = Tally()
    for record in (served(ttft=0.2), served(ttft=0.4), served(status=503), served(model="other")):
        tally.observe(record.finished())
    recent = RecentActivity()
    start = 1_800_000_000.0 - 1_800_000_000.0 % 60
    recent.add(tally.export(), now=start)
    minutes = recent.series("m", now=start + 30)
    assert len(minutes["requests_per_second"]) == 60
    assert minutes["requests_per_second"][-1] == 3 / 60 and minutes["requests_per_second"][0] == 0.0
    assert minutes["error_rate"][-1] == 1 / 3 and minutes["error_rate"][-2] is None
    assert abs((minutes["ttft_seconds"][-1] or 0) - 0.3) < 1e-9
    # An hour on, the minute has left the window and is forgotten once the model is counted again.
    later = start + 3600
    assert recent.series("m", now=later)["requests_per_second"] == [0.0] * 60
    recent.add(tally.export(), now=later)
    assert list(recent._minutes["m"]) == [int(later // 60)]
