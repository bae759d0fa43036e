"""The authentication contract.

An ``Authenticator`` turns a bearer token into an ``Identity`` or raises one of
``gateway.errors.AuthenticationFailed`` (401: missing, malformed, inactive or
expired token), ``PermissionDenied`` (403: the token is valid but the person
may not use the gateway) or ``ServiceUnavailable`` (503: the identity provider
could not be asked). Everything after authentication sees only the ``Identity``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


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


class Authenticator(ABC):
    """Turns a bearer token into an ``Identity``; see the module docstring for the errors."""

    name: str = ""

    @abstractmethod
    async def authenticate(self, token: str) -> Identity: ...

    async def start(self) -> None:
        """Open clients and caches; called once when the gateway starts."""

    async def close(self) -> None:
        """Release clients; called once when the gateway stops."""
