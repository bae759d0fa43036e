"""Rate limits counted in this process: right for one gateway, or for replicas that each get their own share."""

from __future__ import annotations

import time

from gateway.config import LimitSettings
from gateway.limits.base import CONCURRENT, REQUESTS, TOKENS, RateLimiter, Reservation, Rule


class MemoryRateLimiter(RateLimiter):
    """Token buckets (requests, tokens) and slot counts (concurrency) in plain dicts."""

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__(settings)
        # key -> [level, monotonic time of the level]
        self._buckets: dict[str, list[float]] = {}
        self._running: dict[str, int] = {}

    async def _reserve(self, rules: tuple[Rule, ...], tokens: int) -> Reservation:
        now = time.monotonic()
        buckets = self._buckets
        for rule in rules:
            if rule.kind == CONCURRENT:
                if self._running.get(rule.key, 0) >= rule.capacity:
                    raise self.refuse(rule, 1)
                continue
            bucket = buckets.get(rule.key)
            if bucket is None:
                bucket = buckets[rule.key] = [rule.capacity, now]
            else:
                bucket[0] = min(rule.capacity, bucket[0] + (now - bucket[1]) * rule.rate)
                bucket[1] = now
            need = 1.0 if rule.kind == REQUESTS else min(float(tokens), rule.capacity)
            if bucket[0] < need:
                raise self.refuse(rule, (need - bucket[0]) / rule.rate)
        for rule in rules:
            if rule.kind == REQUESTS:
                buckets[rule.key][0] -= 1.0
            elif rule.kind == TOKENS:
                buckets[rule.key][0] -= tokens
            else:
                self._running[rule.key] = self._running.get(rule.key, 0) + 1
        return Reservation(rules, tokens)

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        for rule in reservation.rules:
            if rule.kind == CONCURRENT:
                self._running[rule.key] -= 1
            elif rule.kind == TOKENS and used_tokens is not None:
                bucket = self._buckets[rule.key]
                bucket[0] = min(rule.capacity, bucket[0] + reservation.tokens - used_tokens)
