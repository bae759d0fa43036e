"""Static bearer tokens for the embedded default and for tests."""

from __future__ import annotations

import hmac
import os
import secrets
import shlex
import sys
from pathlib import Path

from gateway.auth.base import Authenticator, Identity
from gateway.errors import AuthenticationFailed

TOKEN_FILE = "dev-token"


def dev_token(state_dir: Path, token_env: str, *, create: bool) -> str | None:
    """The dev token: from ``token_env``, else the one stored in ``state_dir``, else a new one when ``create``."""
    from_env = os.environ.get(token_env)
    if from_env:
        return from_env
    path = state_dir / TOKEN_FILE
    try:
        stored = path.read_text().strip()
    except FileNotFoundError:
        stored = ""
    if stored or not create:
        return stored or None
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = "dev-" + secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    return token


def token_command(config: Path | None = None) -> str:
    """The shell command that prints the dev token, runnable as printed: without an active virtual environment a
    bare ``inference-gateway`` is not on the PATH, and ``$(...)`` would quietly set an empty token."""
    installed = Path(sys.executable).parent / "inference-gateway"
    program = [str(installed)] if installed.is_file() else [sys.executable, "-m", "gateway.cli"]
    words = [*program, "dev-token"]
    if config is not None:
        words += ["--config", str(config)]
    return shlex.join(words)


class DevAuthenticator(Authenticator):
    """Accepts one static token, compared in constant time, as a fixed local user."""

    name = "dev"

    def __init__(self, token: str, username: str = "dev-user") -> None:
        self._token = token.encode()
        self._identity = Identity(
            subject=f"dev:{username}", username=username, name=username, idp_domain="localhost", provider="dev"
        )

    async def authenticate(self, token: str) -> Identity:
        if not hmac.compare_digest(token.encode(), self._token):
            raise AuthenticationFailed("The access token is not valid.")
        return self._identity
