"""Verdicts on tokens, kept so that a known token costs a hash and a dict lookup.

A verdict is either an ``Identity`` or a refusal (401 or 403), with the wall-clock
time it stops being valid. Verdicts are keyed by ``token_key(token)``: the raw
token is never stored. ``VerdictCache`` lives in the process; ``RedisVerdictCache``
keeps the same entries in front of a Redis shared by the gateway's replicas.
``SingleFlight`` makes the requests that arrive together with a new token share
one look-up.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import orjson

from gateway.auth.base import Identity
from gateway.errors import AuthenticationFailed, GatewayError, PermissionDenied

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.auth")


def token_key(token: str) -> str:
    """The cache key of ``token``: its SHA-256, so that neither memory nor Redis holds the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a token was refused, kept as data so that each request raises a fresh error."""

    status: int
    code: str
    message: str

    @classmethod
    def of(cls, error: GatewayError) -> Refusal:
        return cls(error.status, error.code, error.message)

    def error(self) -> GatewayError:
        kind = AuthenticationFailed if self.status == 401 else PermissionDenied
        return kind(self.message, code=self.code)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gateway decided about one token, valid until ``expires_at`` (``time.time()`` seconds)."""

    expires_at: float
    identity: Identity | None = None
    refusal: Refusal | None = None

    def outcome(self) -> Identity:
        """The identity, or raise the refusal."""
        if self.identity is None:
            assert self.refusal is not None
            raise self.refusal.error()
        return self.identity

    def encode(self) -> bytes:
        body: dict[str, Any] = {"expires_at": self.expires_at}
        if self.identity is not None:
            body["identity"] = self.identity.to_dict()
        if self.refusal is not None:
            body["refusal"] = [self.refusal.status, self.refusal.code, self.refusal.message]
        return orjson.dumps(body)

    @classmethod
    def decode(cls, raw: bytes | str) -> Verdict:
        body = orjson.loads(raw)
        identity = body.get("identity")
        refusal = body.get("refusal")
        return cls(
            expires_at=float(body["expires_at"]),
            identity=Identity.from_dict(identity) if identity else None,
            refusal=Refusal(int(refusal[0]), str(refusal[1]), str(refusal[2])) if refusal else None,
        )


class VerdictCache:
    """Verdicts held in this process, at most ``max_entries`` of them.

    ``get`` is the request path and stays synchronous. ``load`` and ``store``
    are the slow path, where a shared tier (see ``RedisVerdictCache``) may be asked.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, Verdict] = {}

    def get(self, key: str) -> Verdict | None:
        verdict = self._entries.get(key)
        if verdict is None or verdict.expires_at <= time.time():
            return None
        return verdict

    def put(self, key: str, verdict: Verdict) -> None:
        if len(self._entries) >= self.max_entries and key not in self._entries:
            self._make_room()
        self._entries[key] = verdict

    def _make_room(self) -> None:
        now = time.time()
        expired = [key for key, verdict in self._entries.items() if verdict.expires_at <= now]
        for key in expired:
            del self._entries[key]
        overflow = len(self._entries) - self.max_entries + 1
        if overflow > 0:
            # Dicts keep insertion order: the oldest verdicts go first.
            for key in list(islice(self._entries, overflow)):
                del self._entries[key]

    async def load(self, key: str) -> Verdict | None:
        """A verdict another replica may have reached; none in a single process."""
        return None

    async def store(self, key: str, verdict: Verdict) -> None:
        self.put(key, verdict)

    async def close(self) -> None:
        self._entries.clear()


class RedisVerdictCache(VerdictCache):
    """The in-process cache in front of Redis, so replicas introspect each token once between them.

    An entry keeps the absolute expiry it had in Redis, so no replica holds a verdict
    longer than the one that reached it. When Redis cannot be reached the gateway
    goes on with its own cache and says so once in the log.
    """

    def __init__(self, redis: Redis, prefix: str, max_entries: int = 100_000) -> None:
        super().__init__(max_entries)
        self._redis = redis
        self._prefix = prefix
        self._healthy = True

    @classmethod
    def from_url(cls, url: str, prefix: str, max_entries: int = 100_000, timeout: float = 0.5) -> RedisVerdictCache:
        from redis.asyncio import Redis

        client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return cls(client, prefix, max_entries)

    async def load(self, key: str) -> Verdict | None:
        from redis.exceptions import RedisError

        try:
            raw = await self._redis.get(self._prefix + key)
        except RedisError as exc:
            self._unhealthy(exc)
            return None
        self._recovered()
        if raw is None:
            return None
        verdict = Verdict.decode(raw)
        if verdict.expires_at <= time.time():
            return None
        self.put(key, verdict)
        return verdict

    async def store(self, key: str, verdict: Verdict) -> None:
        from redis.exceptions import RedisError

        self.put(key, verdict)
        milliseconds = int((verdict.expires_at - time.time()) * 1000)
        if milliseconds <= 0:
            return
        try:
            await self._redis.set(self._prefix + key, verdict.encode(), px=milliseconds)
        except RedisError as exc:
            self._unhealthy(exc)
            return
        self._recovered()

    async def close(self) -> None:
        await super().close()
        await self._redis.aclose()

    def _unhealthy(self, exc: Exception) -> None:
        if self._healthy:
            log.warning("the shared auth cache (Redis) failed, using this process's cache alone: %s", exc)
        self._healthy = False

    def _recovered(self) -> None:
        if not self._healthy:
            log.warning("the shared auth cache (Redis) answers again")
        self._healthy = True


class SingleFlight:
    """At most one look-up per key at a time; callers that arrive meanwhile share its result.

    The caller awaits the returned future through ``asyncio.shield`` so that one
    caller giving up does not cancel the look-up the others wait for.
    """

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[Verdict]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str, look_up: Callable[[], Awaitable[Verdict]]) -> asyncio.Future[Verdict]:
        """The look-up in flight for ``key``, started with ``look_up()`` if there is none."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(look_up())
            self._flights[key] = flight
            flight.add_done_callback(functools.partial(self._landed, key))
        return flight

    def _landed(self, key: str, flight: asyncio.Future[Verdict]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            # Everyone may have stopped waiting (timeout); read the outcome so asyncio does not report it as lost.
            flight.exception()

    async def close(self) -> None:
        flights = list(self._flights.values())
        for flight in flights:
            flight.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
