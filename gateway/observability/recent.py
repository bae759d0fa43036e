"""The last hour of each model's traffic, a minute at a time, for the status page's charts.

It is fed from the usage writer's reports (the same ``Tally`` exports the metrics add up), so the request path pays
nothing for it: per model and minute it keeps requests, failed requests, and the sum and count of times to first
token. Minutes older than the window are dropped as new ones start.
"""

from __future__ import annotations

import time
from typing import Any

WINDOW_MINUTES = 60


class _Minute:
    __slots__ = ("errors", "requests", "ttft_count", "ttft_total")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.ttft_total = 0.0
        self.ttft_count = 0


class RecentActivity:
    """Per model, the last ``WINDOW_MINUTES`` minutes of requests, errors and time to first token."""

    def __init__(self, window: int = WINDOW_MINUTES) -> None:
        self.window = window
        self._minutes: dict[str, dict[int, _Minute]] = {}

    def add(self, exported: dict[str, list[list[Any]]], now: float | None = None) -> None:
        """Count one ``Tally.export`` as having happened in the current minute."""
        minute = int((time.time() if now is None else now) // 60)
        for _route, model, _cluster, status, count in exported.get("requests", ()):
            if not model:
                continue
            bucket = self._bucket(model, minute)
            bucket.requests += count
            if status >= 400:
                bucket.errors += count
        for model, counts, total in exported.get("ttft", ()):
            if model:
                bucket = self._bucket(model, minute)
                bucket.ttft_count += sum(counts)
                bucket.ttft_total += total

    def _bucket(self, model: str, minute: int) -> _Minute:
        minutes = self._minutes.setdefault(model, {})
        bucket = minutes.get(minute)
        if bucket is None:
            bucket = minutes[minute] = _Minute()
            for old in [key for key in minutes if key <= minute - self.window]:
                del minutes[old]
        return bucket

    def series(self, model: str, now: float | None = None) -> dict[str, list[float | None]]:
        """The window's minutes, oldest first: requests per second, error rate (a fraction, None without
        requests) and mean time to first token in seconds (None without streams)."""
        current = int((time.time() if now is None else now) // 60)
        minutes = self._minutes.get(model, {})
        rate: list[float | None] = []
        errors: list[float | None] = []
        ttft: list[float | None] = []
        for minute in range(current - self.window + 1, current + 1):
            bucket = minutes.get(minute)
            if bucket is None:
                rate.append(0.0)
                errors.append(None)
                ttft.append(None)
                continue
            rate.append(bucket.requests / 60)
            errors.append(bucket.errors / bucket.requests if bucket.requests else None)
            ttft.append(bucket.ttft_total / bucket.ttft_count if bucket.ttft_count else None)
        return {"requests_per_second": rate, "error_rate": errors, "ttft_seconds": ttft}
