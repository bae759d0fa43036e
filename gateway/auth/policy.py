"""Who may use the gateway, decided from a Globus token introspection and the caller's groups.

``AccessPolicy.admit`` reads an introspection answer (RFC 7662 with Globus'
fields: ``identity_set_detail``, ``session_info``, ``policy_evaluations``) and
returns the caller's ``Identity`` or raises the refusal that says why:
401 for a token that is not active or has expired, 403 for a missing scope, an
unmet session policy, a service account that is not listed or an identity
provider that is not allowed. ``require_groups`` then applies the group rule,
once the caller's groups are known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.auth.base import Identity
from gateway.errors import AuthenticationFailed, PermissionDenied

# The username domain Globus Auth gives to client identities (service accounts).
CLIENT_IDENTITY_DOMAIN = "clients.auth.globus.org"

_LOG_IN_AGAIN = "log out at https://app.globus.org/logout, then run `inference-auth-token authenticate --force`"


def domain_of(username: str) -> str:
    """The identity-provider domain of a Globus username (``jdoe@anl.gov`` -> ``anl.gov``)."""
    return username.rpartition("@")[2].lower()


@dataclass(frozen=True)
class AccessPolicy:
    """The gateway-wide rules. Empty collections mean no restriction of that kind."""

    scope: str
    session_policies: frozenset[str] = frozenset()
    allowed_domains: frozenset[str] = frozenset()
    required_groups: frozenset[str] = frozenset()
    service_accounts: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        scope: str,
        *,
        session_policies: Iterable[str] = (),
        allowed_domains: Iterable[str] = (),
        required_groups: Iterable[str] = (),
        service_accounts: Iterable[str] = (),
    ) -> AccessPolicy:
        return cls(
            scope=scope,
            session_policies=frozenset(session_policies),
            allowed_domains=frozenset(domain.lower() for domain in allowed_domains),
            required_groups=frozenset(required_groups),
            service_accounts=frozenset(service_accounts),
        )

    def admit(self, info: Mapping[str, Any], now: float) -> Identity:
        """The caller named by the introspection ``info``, or the 401/403 that refuses them."""
        if info.get("active") is not True:
            raise AuthenticationFailed(
                "The access token is not active: it has expired, was revoked, or is not a Globus token. "
                "Get a current one with `inference-auth-token get_access_token`.",
                code="invalid_token",
            )
        expires = info.get("exp")
        if isinstance(expires, int | float) and expires <= now:
            raise AuthenticationFailed(
                "The access token has expired. Get a current one with `inference-auth-token get_access_token`.",
                code="token_expired",
            )
        if self.scope not in str(info.get("scope") or "").split():
            raise PermissionDenied(
                "The access token was not issued for this gateway (its scope is missing). "
                "Get one with `inference-auth-token authenticate --force`.",
                code="insufficient_scope",
            )
        self._check_session_policies(info)
        username = str(info.get("username") or "")
        if domain_of(username) == CLIENT_IDENTITY_DOMAIN:
            return self._service_account(info, username)
        return self._person(info)

    def require_groups(self, identity: Identity) -> None:
        """403 unless ``identity`` is in one of the required groups; listed service accounts are exempt."""
        if not self.required_groups or identity.idp_domain == CLIENT_IDENTITY_DOMAIN:
            return
        if self.required_groups.isdisjoint(identity.groups):
            raise PermissionDenied(
                "You are not a member of a Globus group that may use this gateway; "
                "ask the gateway's operators which group to join.",
                code="group_required",
            )

    @property
    def uses_groups(self) -> bool:
        return bool(self.required_groups)

    def _check_session_policies(self, info: Mapping[str, Any]) -> None:
        if not self.session_policies:
            return
        evaluations = info.get("policy_evaluations") or {}
        unmet = sorted(
            policy
            for policy in self.session_policies
            if not (isinstance(evaluations.get(policy), dict) and evaluations[policy].get("evaluation") is True)
        )
        if unmet:
            raise PermissionDenied(
                f"Your Globus session does not satisfy this gateway's session policy ({', '.join(unmet)}): "
                f"it may need a recent login with a particular identity provider. To fix it, {_LOG_IN_AGAIN}.",
                code="session_policy_not_met",
            )

    def _service_account(self, info: Mapping[str, Any], username: str) -> Identity:
        subject = str(info.get("sub") or "")
        if subject not in self.service_accounts and username not in self.service_accounts:
            raise PermissionDenied(
                f"The service account {username} is not allowed to use this gateway; "
                "ask the gateway's operators to list it.",
                code="service_account_not_allowed",
            )
        return Identity(
            subject=subject,
            username=username,
            name=str(info.get("name") or username),
            idp_domain=CLIENT_IDENTITY_DOMAIN,
            identity_set=tuple(str(member) for member in info.get("identity_set") or (subject,)),
            client_id=_optional_str(info.get("client_id")),
            provider="globus",
        )

    def _person(self, info: Mapping[str, Any]) -> Identity:
        chosen = self._presented_identity(info)
        if chosen is None:
            seen = ", ".join(str(identity.get("username")) for identity in _session_identities(info)) or "none"
            allowed = ", ".join(sorted(self.allowed_domains))
            raise PermissionDenied(
                f"Your Globus session has no identity from an allowed organisation (allowed: {allowed}; "
                f"this session: {seen}). To use another identity, {_LOG_IN_AGAIN} "
                "and sign in with an allowed organisation.",
                code="identity_provider_not_allowed",
            )
        username = str(chosen.get("username") or "")
        subject = str(info.get("sub") or chosen.get("sub") or "")
        return Identity(
            subject=subject,
            username=username,
            name=str(chosen.get("name") or info.get("name") or ""),
            idp_domain=domain_of(username),
            identity_set=tuple(str(member) for member in info.get("identity_set") or (subject,)),
            client_id=_optional_str(info.get("client_id")),
            provider="globus",
        )

    def _presented_identity(self, info: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The identity the gateway knows the caller by.

        The first identity the caller logged in with in this session whose domain
        is allowed; the token's primary identity when the session names none.
        """
        for identity in _session_identities(info):
            if not self.allowed_domains or domain_of(str(identity.get("username") or "")) in self.allowed_domains:
                return identity
        return None


def _session_identities(info: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    details = [detail for detail in info.get("identity_set_detail") or () if isinstance(detail, dict)]
    by_id = {detail.get("sub"): detail for detail in details}
    authentications = (info.get("session_info") or {}).get("authentications") or {}
    in_session = [by_id[identity_id] for identity_id in authentications if identity_id in by_id]
    if in_session:
        return in_session
    primary = by_id.get(info.get("sub"))
    return [primary or {"sub": info.get("sub"), "username": info.get("username"), "name": info.get("name")}]


def _optional_str(value: Any) -> str | None:
    return str(value) if value else None
