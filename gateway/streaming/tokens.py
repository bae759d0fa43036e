"""The signed, expiring tokens that let a worker write one stream."""

from __future__ import annotations

import hashlib
import hmac
import math
import time


class StreamTokens:
    """Issues and checks ``EXPIRY.SIGNATURE`` tokens: HMAC-SHA256 of the stream id and expiry under a secret.

    A token says who may write a stream until when; that it is used once is for the relay to enforce.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the relay secret must be at least 16 bytes")
        self._secret = secret

    def _signature(self, stream_id: str, expires: int) -> bytes:
        return hmac.new(self._secret, f"{stream_id}.{expires}".encode(), hashlib.sha256).hexdigest().encode()

    def issue(self, stream_id: str, expires: float) -> str:
        """A token for ``stream_id`` valid until ``expires`` (epoch seconds)."""
        deadline = math.ceil(expires)
        return f"{deadline}.{self._signature(stream_id, deadline).decode()}"

    def verify(self, stream_id: str, token: str, now: float | None = None) -> bool:
        """Whether ``token`` was issued for ``stream_id`` by this secret and has not expired."""
        expires, _, signature = token.partition(".")
        if not expires.isdigit() or len(expires) > 12:
            return False
        if not hmac.compare_digest(signature.encode(), self._signature(stream_id, int(expires))):
            return False
        return int(expires) >= (time.time() if now is None else now)
