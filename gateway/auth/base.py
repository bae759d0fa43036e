"""The authentication contract.

An ``Authenticator`` turns a bearer token into an ``Identity`` or raises one of
``gateway.errors.AuthenticationFailed`` (401: missing, malformed, inactive or
expired token), ``PermissionDenied`` (403: the token is valid but the person
may not use the gateway) or ``ServiceUnavailable`` (503: the identity provider
could not be asked). Everything after authentication sees only the ``Identity``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller, as the rest of the gateway knows them."""

    subject: str
    username: str
    name: str = ""
    idp_domain: str = ""
    identity_set: tuple[str, ...] = ()
    groups: frozenset[str] = field(default_factory=frozenset)
    client_id: str | None = None
    provider: str = "dev"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, groups sorted."""
        return {
            "subject": self.subject,
            "username": self.username,
            "name": self.name,
            "idp_domain": self.idp_domain,
            "identity_set": list(self.identity_set),
            "groups": sorted(self.groups),
            "client_id": self.client_id,
            "provider": self.provider,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Identity:
        return cls(
            subject=data["subject"],
            username=data["username"],
            name=data["name"],
            idp_domain=data["idp_domain"],
            identity_set=tuple(data["identity_set"]),
            groups=frozenset(data["groups"]),
            client_id=data["client_id"],
            provider=data["provider"],
        )


class Authenticator(ABC):
    """Turns a bearer token into an ``Identity``; see the module docstring for the errors."""

    name: str = ""

    @abstractmethod
    async def authenticate(self, token: str) -> Identity: ...

    def browser_login(self) -> dict[str, Any] | None:
        """Where the status page sends a browser to log in (an authorization code with PKCE): ``authorize_url``,
        ``client_id``, ``scope`` and ``session_required_policies``; None for a provider without such a login."""
        return None

    async def redeem_code(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        """The access token (``access_token``, ``expires_in``) for a browser's authorization code; only providers
        with a ``browser_login``. Raises ``AuthenticationFailed`` when the code is refused."""
        raise NotImplementedError

    async def start(self) -> None:
        """Open clients and caches; called once when the gateway starts."""

    async def close(self) -> None:
        """Release clients; called once when the gateway stops."""
