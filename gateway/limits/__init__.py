"""Rate limits: requests per second, tokens per minute and concurrent requests, per user and per model."""

from __future__ import annotations

from gateway.config import LimitSettings
from gateway.limits.base import RateLimiter
from gateway.limits.memory import MemoryRateLimiter


def build_limiter(settings: LimitSettings) -> RateLimiter:
    """The Redis limiter when a Redis URL is configured, the in-process one otherwise."""
    url = settings.resolved_redis_url()
    if url:
        from gateway.limits.redis import RedisRateLimiter

        return RedisRateLimiter(settings, url)
    return MemoryRateLimiter(settings)
