"""The tokens that let a worker write one stream back to the gateway."""

from __future__ import annotations

import time

import pytest

from gateway.streaming.tokens import StreamTokens

TOKENS = StreamTokens(b"k" * 32)


def test_a_token_opens_its_own_stream_until_it_expires() -> None:
    expires = time.time() + 60
    token = TOKENS.issue("stream-1", expires)
    assert TOKENS.verify("stream-1", token)
    assert TOKENS.verify("stream-1", token, now=expires)
    assert not TOKENS.verify("stream-1", token, now=expires + 1)


def test_a_token_does_not_open_another_stream() -> None:
    assert not TOKENS.verify("stream-2", TOKENS.issue("stream-1", time.time() + 60))


def test_another_gateways_token_is_refused() -> None:
    other = StreamTokens(b"o" * 32).issue("stream-1", time.time() + 60)
    assert not TOKENS.verify("stream-1", other)


def test_a_later_expiry_cannot_be_written_into_a_token() -> None:
    expires, _, signature = TOKENS.issue("stream-1", time.time() + 60).partition(".")
    assert not TOKENS.verify("stream-1", f"{int(expires) + 3600}.{signature}")


@pytest.mark.parametrize("token", ["", ".", "abc", "1.", "x.y", "9" * 40 + ".00", "1.é", "-1.abc"])
def test_malformed_tokens_are_refused(token: str) -> None:
    assert not TOKENS.verify("stream-1", token)


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        StreamTokens(b"short")
