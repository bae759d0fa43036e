"""The gateway's Prometheus metrics.

The request path only bumps plain numbers in dicts; they become Prometheus metric families when
``/metrics`` is scraped, through a collector on a registry of the gateway's own. This keeps the
per-request cost to a few dict operations instead of a lock and a label lookup per metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.accounting.record import RequestRecord
from gateway.accounting.writer import UsageWriter
from gateway.federation.registry import Registry
from gateway.limits.base import RateLimiter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Bucket counts and a sum; ``observe`` is one bisection and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return buckets


class GatewayMetrics(Collector):
    """Everything ``/metrics`` shows; see docs/observability.md for the list."""

    def __init__(self, registry: Registry, usage: UsageWriter | None, limiter: RateLimiter) -> None:
        self.endpoints = registry
        self.usage = usage
        self.limiter = limiter
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.streams_open = 0
        self.streams: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def observe(self, record: RequestRecord, route: str) -> None:
        """Count one finished request."""
        model = record.model or ""
        key = (route, model, record.cluster or "", record.status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        latency = self.latency.get((route, model))
        if latency is None:
            latency = self.latency[(route, model)] = Histogram(LATENCY_BUCKETS)
        latency.observe(record.duration)
        if record.ttft is not None:
            ttft = self.ttft.get(model)
            if ttft is None:
                ttft = self.ttft[model] = Histogram(TTFT_BUCKETS)
            ttft.observe(record.ttft)
        if record.prompt_tokens:
            self._add_tokens(model, "prompt", record.prompt_tokens)
        if record.completion_tokens:
            self._add_tokens(model, "completion", record.completion_tokens)

    def _add_tokens(self, model: str, kind: str, count: int) -> None:
        key = (model, kind)
        self.tokens[key] = self.tokens.get(key, 0) + count

    def stream_ended(self, outcome: str) -> None:
        self.streams_open -= 1
        self.streams[outcome] = self.streams.get(outcome, 0) + 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_requests", "HTTP requests answered", labels=["route", "model", "cluster", "status"]
        )
        for (route, model, cluster, status), count in list(self.requests.items()):
            requests.add_metric([route, model, cluster, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to its last byte",
            labels=["route", "model"],
        )
        for (route, model), histogram in list(self.latency.items()):
            latency.add_metric([route, model], histogram.cumulative(), histogram.total)
        yield latency
        ttft = HistogramMetricFamily(
            "gateway_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first event",
            labels=["model"],
        )
        for model, histogram in list(self.ttft.items()):
            ttft.add_metric([model], histogram.cumulative(), histogram.total)
        yield ttft
        tokens = CounterMetricFamily("gateway_tokens", "Tokens reported by backends", labels=["model", "kind"])
        for (model, kind), count in list(self.tokens.items()):
            tokens.add_metric([model, kind], count)
        yield tokens
        yield GaugeMetricFamily("gateway_requests_in_flight", "Requests being served", value=self.in_flight)
        yield GaugeMetricFamily("gateway_relay_streams_open", "Event streams being relayed", value=self.streams_open)
        streams = CounterMetricFamily("gateway_relay_streams", "Event streams relayed, by end", labels=["outcome"])
        for outcome, count in list(self.streams.items()):
            streams.add_metric([outcome], count)
        yield streams
        yield from self._endpoint_states()
        yield from self._usage_log()
        refusals = CounterMetricFamily("gateway_rate_limited", "Requests refused by a rate limit", labels=["limit"])
        for setting, count in list(self.limiter.refusals.items()):
            refusals.add_metric([setting], count)
        yield refusals

    def _endpoint_states(self) -> Iterator[Metric]:
        states = GaugeMetricFamily(
            "gateway_endpoint_state",
            "1 for each endpoint's current state",
            labels=["endpoint", "cluster", "framework", "state"],
        )
        now = time.monotonic()
        for endpoint in self.endpoints.endpoints:
            up = endpoint.is_up(now)
            for state, current in (("online", up), ("unreachable", not up)):
                states.add_metric([endpoint.id, endpoint.cluster, endpoint.framework, state], 1.0 if current else 0.0)
        yield states

    def _usage_log(self) -> Iterator[Metric]:
        usage = self.usage
        if usage is None:
            return
        yield GaugeMetricFamily("gateway_usage_queue_depth", "Usage rows waiting to be written", value=usage.depth)
        yield CounterMetricFamily(
            "gateway_usage_rows_dropped", "Usage rows lost because the queue was full", value=usage.dropped
        )
        yield CounterMetricFamily(
            "gateway_usage_rows_written", "Usage rows stored in the database", value=usage.written
        )
        yield CounterMetricFamily(
            "gateway_usage_rows_spooled", "Usage rows kept on disk while the database was down", value=usage.spooled
        )
        yield GaugeMetricFamily(
            "gateway_usage_database_up", "1 when the last write to the database worked", value=float(usage.database_up)
        )
