"""The counts of finished requests that ``/metrics`` shows, kept as plain numbers.

The usage writer process keeps one ``Tally`` of what it is handed and sends it to the gateway with each report
(``export``), starting a new one; the gateway adds each into its running totals (``merge``), which the metrics
collector reads when scraped. The serving process does nothing per request for these counts but hand the record
over, which it does anyway for the usage log and the access log.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from gateway.accounting.record import FinishedRequest

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

    def add(self, counts: list[int], total: float) -> None:
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, counts, strict=True)]
        self.total += total

    def cumulative(self) -> list[tuple[str, float]]:
        buckets = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return buckets


class Tally:
    """Requests by route, model, cluster and status; latency and time-to-first-token histograms; tokens by model
    and kind; relayed streams by how they ended."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.streams: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.requests)

    def observe(self, record: FinishedRequest) -> None:
        """Count one finished request."""
        model = record.model or ""
        key = (record.route, model, record.cluster or "", record.status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        latency = self.latency.get((record.route, model))
        if latency is None:
            latency = self.latency[(record.route, model)] = Histogram(LATENCY_BUCKETS)
        latency.observe(record.duration)
        if record.ttft is not None:
            ttft = self.ttft.get(model)
            if ttft is None:
                ttft = self.ttft[model] = Histogram(TTFT_BUCKETS)
            ttft.observe(record.ttft)
        tokens = self.tokens
        if record.prompt_tokens:
            tokens[(model, "prompt")] = tokens.get((model, "prompt"), 0) + record.prompt_tokens
        if record.completion_tokens:
            tokens[(model, "completion")] = tokens.get((model, "completion"), 0) + record.completion_tokens
        if record.stream and record.status == 200:
            # A relayed stream: it ended as its in-band error or its client's departure says, or completed.
            outcome = record.error_code or "completed"
            self.streams[outcome] = self.streams.get(outcome, 0) + 1

    def export(self) -> dict[str, list[list[Any]]]:
        """The counts as JSON-ready lists, for the gateway's ``merge``."""
        return {
            "requests": [[*key, count] for key, count in self.requests.items()],
            "latency": [[*key, h.counts, h.total] for key, h in self.latency.items()],
            "ttft": [[model, h.counts, h.total] for model, h in self.ttft.items()],
            "tokens": [[*key, count] for key, count in self.tokens.items()],
            "streams": [[outcome, count] for outcome, count in self.streams.items()],
        }

    def merge(self, exported: dict[str, list[list[Any]]]) -> None:
        """Add another tally's ``export`` to this one."""
        for route, model, cluster, status, count in exported["requests"]:
            key = (route, model, cluster, status)
            self.requests[key] = self.requests.get(key, 0) + count
        for route, model, counts, total in exported["latency"]:
            histogram = self.latency.get((route, model))
            if histogram is None:
                histogram = self.latency[(route, model)] = Histogram(LATENCY_BUCKETS)
            histogram.add(counts, total)
        for model, counts, total in exported["ttft"]:
            histogram = self.ttft.get(model)
            if histogram is None:
                histogram = self.ttft[model] = Histogram(TTFT_BUCKETS)
            histogram.add(counts, total)
        for model, kind, count in exported["tokens"]:
            self.tokens[(model, kind)] = self.tokens.get((model, kind), 0) + count
        for outcome, count in exported["streams"]:
            self.streams[outcome] = self.streams.get(outcome, 0) + count
