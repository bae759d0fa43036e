"""The gateway's Prometheus metrics.

The counts of finished requests are kept by the usage writer process (``gateway.observability.tally``) from the
records the gateway hands it anyway, and reach the gateway with its reports; the request path itself only moves
the in-flight gauges. Everything becomes Prometheus metric families when ``/metrics`` is scraped, through a
collector on a registry of the gateway's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.federation.registry import Registry
from gateway.limits.base import RateLimiter
from gateway.observability.writer import UsageWriter


class GatewayMetrics(Collector):
    """Everything ``/metrics`` shows; see docs/observability.md for the list."""

    def __init__(self, registry: Registry, writer: UsageWriter, limiter: RateLimiter, usage_log: bool) -> None:
        self.endpoints = registry
        self.writer = writer
        self.usage_log = usage_log
        self.limiter = limiter
        self.in_flight = 0
        self.streams_open = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        tally = self.writer.tally
        requests = CounterMetricFamily(
            "gateway_requests", "HTTP requests answered", labels=["route", "model", "cluster", "status"]
        )
        for (route, model, cluster, status), count in list(tally.requests.items()):
            requests.add_metric([route, model, cluster, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to its last byte",
            labels=["route", "model"],
        )
        for (route, model), histogram in list(tally.latency.items()):
            latency.add_metric([route, model], histogram.cumulative(), histogram.total)
        yield latency
        ttft = HistogramMetricFamily(
            "gateway_time_to_first_token_seconds",
            "Time from a streamed request's arrival to its first event",
            labels=["model"],
        )
        for model, histogram in list(tally.ttft.items()):
            ttft.add_metric([model], histogram.cumulative(), histogram.total)
        yield ttft
        tokens = CounterMetricFamily("gateway_tokens", "Tokens reported by backends", labels=["model", "kind"])
        for (model, kind), count in list(tally.tokens.items()):
            tokens.add_metric([model, kind], count)
        yield tokens
        yield GaugeMetricFamily("gateway_requests_in_flight", "Requests being served", value=self.in_flight)
        yield GaugeMetricFamily("gateway_relay_streams_open", "Event streams being relayed", value=self.streams_open)
        streams = CounterMetricFamily("gateway_relay_streams", "Event streams relayed, by end", labels=["outcome"])
        for outcome, count in list(tally.streams.items()):
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
        if not self.usage_log:
            return
        usage = self.writer
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
