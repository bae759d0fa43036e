"""Rate limits counted in Redis, so that every replica of the gateway holds a user to the same limit.

A reservation is one script call (one round trip); settlements are sent in pipelined batches by a
background task. Time comes from the Redis server, so replicas with drifting clocks agree. When
Redis cannot be reached, requests are let through (and the readiness probe says so): a broken
counter should not take the service down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import LimitSettings
from gateway.limits.base import CONCURRENT, REQUESTS, Plan, RateLimiter, Reservation, Rule

log = logging.getLogger("gateway.limits")


_KIND = {REQUESTS: "r", CONCURRENT: "c"}

# ARGV: tokens, reservation id, lease (ms), then per KEY: kind (r, t or c), capacity, rate per ms.
# Returns {0, 0} when reserved, else {index of the broken rule (1-based), ms to wait}.
_RESERVE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tokens = tonumber(ARGV[1])
local levels = {}
for i, key in ipairs(KEYS) do
  local kind, capacity, rate = ARGV[3 * i + 1], tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= capacity then return {i, 1000} end
  else
    local state = redis.call('HMGET', key, 'level', 'stamp')
    local level = tonumber(state[1]) or capacity
    local stamp = tonumber(state[2]) or now
    level = math.min(capacity, level + math.max(0, now - stamp) * rate)
    local need = 1
    if kind == 't' then need = math.min(tokens, capacity) end
    if level < need then return {i, math.ceil((need - level) / rate)} end
    levels[i] = level
  end
end
for i, key in ipairs(KEYS) do
  local kind, capacity, rate = ARGV[3 * i + 1], tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  if kind == 'c' then
    redis.call('ZADD', key, now + tonumber(ARGV[3]), ARGV[2])
    redis.call('PEXPIRE', key, tonumber(ARGV[3]))
  else
    local take = 1
    if kind == 't' then take = tokens end
    local level = levels[i] - take
    redis.call('HSET', key, 'level', tostring(level), 'stamp', tostring(now))
    -- Once the bucket would be full again, a missing key means the same thing.
    redis.call('PEXPIRE', key, math.ceil((capacity - level) / rate) + 1000)
  end
end
return {0, 0}
"""

# ARGV: lease (ms), then the ids of the slots still held, each with its number of keys, and per key the key's
# index in KEYS. Each slot that is still there gets a new lease from now.
_RENEW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[1])
local i = 2
while i <= #ARGV do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  for j = 1, count do
    local key = KEYS[tonumber(ARGV[i + 1 + j])]
    if redis.call('ZSCORE', key, id) then
      redis.call('ZADD', key, now + lease, id)
      redis.call('PEXPIRE', key, lease)
    end
  end
  i = i + 2 + count
end
return 0
"""

# ARGV: tokens to give back (negative: to take), reservation id, then per KEY: kind, capacity.
_SETTLE = """
local back = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local kind, capacity = ARGV[2 * i + 1], tonumber(ARGV[2 * i + 2])
  if kind == 'c' then
    redis.call('ZREM', key, ARGV[2])
  elseif kind == 't' and back ~= 0 then
    local level = tonumber(redis.call('HGET', key, 'level'))
    if level then
      redis.call('HSET', key, 'level', tostring(math.min(capacity, level + back)))
    end
  end
end
return 0
"""


class RedisRateLimiter(RateLimiter):
    """The same rules as the in-process limiter, with the buckets and slots kept in Redis."""

    def __init__(self, settings: LimitSettings, url: str) -> None:
        super().__init__(settings)
        self.url = re.sub(r"//[^@/]*@", "//***@", url)
        self.prefix = settings.redis_prefix
        self.client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._reserve_script = self.client.register_script(_RESERVE)
        self._settle_script = self.client.register_script(_SETTLE)
        self._renew_script = self.client.register_script(_RENEW)
        # A slot is leased for ``lease_ms`` and the lease renewed while its request runs, so that the slots of a
        # replica that died free themselves soon after it: reservation id -> the slot keys it holds.
        self.lease_ms = int(settings.concurrency_lease_seconds * 1000)
        self._held: dict[str, list[str]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._pending: list[tuple[Reservation, int]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing_since = 0.0

    def prepare(self, rules: tuple[Rule, ...]) -> tuple[list[str], list[Any], list[Any], list[str]]:
        """The scripts' keys, their per-key arguments for reserving and for settling, and the slot keys."""
        keys = [self.prefix + rule.key for rule in rules]
        slots = [key for key, rule in zip(keys, rules, strict=True) if rule.kind == CONCURRENT]
        reserve: list[Any] = []
        settle: list[Any] = []
        for rule in rules:
            kind = _KIND.get(rule.kind, "t")
            reserve += [kind, rule.capacity, rule.rate / 1000.0]
            settle += [kind, rule.capacity]
        return keys, reserve, settle, slots

    def _unavailable(self, exc: Exception) -> None:
        if not self._failing_since:
            self._failing_since = time.monotonic()
            log.error("rate-limit Redis at %s unavailable, requests are let through: %s", self.url, exc)

    async def _take(self, plan: Plan, tokens: int) -> Reservation:
        keys, arguments, _, slots = plan.state
        reservation = (plan, tokens, os.urandom(8).hex())
        try:
            broken, wait_ms = await self._reserve_script(
                keys=keys, args=[tokens, reservation[2], self.lease_ms, *arguments]
            )
        except (RedisError, OSError) as exc:
            self._unavailable(exc)
            return (None, 0, "")
        if self._failing_since:
            log.warning("rate-limit Redis at %s is back", self.url)
            self._failing_since = 0.0
        if broken:
            raise self.refuse(plan.rules[int(broken) - 1], int(wait_ms) / 1000.0)
        if slots:
            self._held[reservation[2]] = slots
        return reservation

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        plan, tokens, _ = reservation
        if plan is None:
            return
        back = 0 if used_tokens is None else tokens - used_tokens
        self._held.pop(reservation[2], None)
        self._pending.append((reservation, back))
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._send_settlements(), name="rate-limit-settlements")
        self._renewer = asyncio.create_task(self._renew_leases(), name="rate-limit-leases")

    async def _renew_leases(self) -> None:
        """Every third of a lease, renew the leases of the slots this replica holds, in one script call."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            if not self._held:
                continue
            keys: list[str] = []
            index: dict[str, int] = {}
            arguments: list[Any] = [self.lease_ms]
            for id, slots in list(self._held.items()):
                arguments += [id, len(slots)]
                for key in slots:
                    if key not in index:
                        index[key] = len(keys) + 1
                        keys.append(key)
                    arguments.append(index[key])
            try:
                await self._renew_script(keys=keys, args=arguments)
            except (RedisError, OSError) as exc:
                self._unavailable(exc)

    async def _send_settlements(self) -> None:
        while not self._stopping or self._pending:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for (plan, _, id), back in batch:
                        assert plan is not None
                        keys, _, arguments, _ = plan.state
                        await self._settle_script(keys=keys, args=[back, id, *arguments], client=pipe)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                # Slots then expire with their lease and token buckets refill on their own.
                self._unavailable(exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 5)
            self._task = None
        await self.client.aclose()

    async def check(self) -> str | None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            return f"Redis at {self.url}: {exc}"
        return None
