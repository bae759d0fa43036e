"""Globus Auth: access tokens checked by introspection, groups read through a dependent token.

The gateway is a Globus confidential client. For a token it has not seen, it
asks Globus Auth to introspect it (with the operator's session policies), and,
when some rule needs them, reads the caller's groups from the Groups API with a
dependent token. The verdict is cached (see ``gateway.auth.cache``), so the next
request with the same token costs a hash and a dict lookup. The SDK's calls
block, so they run on a small thread pool, and a request waits for them at most
``timeout`` seconds: past that, or when Globus answers 5xx or cannot be reached,
the answer is 503, never a 401 for an outage of ours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import globus_sdk
import orjson
import yaml
from globus_sdk.transport import RequestsTransport, RetryConfig

from gateway.auth.base import Authenticator, Identity
from gateway.auth.cache import RedisVerdictCache, Refusal, SingleFlight, Verdict, VerdictCache, token_key
from gateway.auth.policy import AccessPolicy
from gateway.config import ConfigError, GlobusAuthSettings
from gateway.errors import AuthenticationFailed, GatewayError, PermissionDenied, ServiceUnavailable

log = logging.getLogger("gateway.auth")

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
INTROSPECT_INCLUDE = "session_info,identity_set_detail"

_TRY_AGAIN = {"retry-after": "5"}


def default_scope(client_id: str) -> str:
    """The scope users request for a gateway registered as Globus client ``client_id``."""
    return f"https://auth.globus.org/scopes/{client_id}/action_all"


@dataclass(frozen=True)
class ClientCredentials:
    """The gateway's Globus client id and secret."""

    client_id: str
    client_secret: str = field(repr=False)

    @classmethod
    def load(cls, settings: GlobusAuthSettings) -> ClientCredentials:
        """From the environment variables the settings name, else from ``secrets_file``.

        The secrets file is YAML with ``client_id`` and ``client_secret`` and must
        not be readable by group or others.
        """
        client_id = os.environ.get(settings.client_id_env, "")
        client_secret = os.environ.get(settings.client_secret_env, "")
        if client_id and client_secret:
            return cls(client_id, client_secret)
        if settings.secrets_file:
            return cls._from_file(Path(settings.secrets_file).expanduser())
        raise ConfigError(
            "Globus auth needs the gateway's client credentials: set "
            f"{settings.client_id_env} and {settings.client_secret_env}, or name a secrets_file under auth.globus."
        )

    @classmethod
    def _from_file(cls, path: Path) -> ClientCredentials:
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the Globus secrets file: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: the Globus secrets file is open to other users (mode {stat.S_IMODE(mode):04o}); "
                f"run `chmod 600 {path}`."
            )
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict) or not data.get("client_id") or not data.get("client_secret"):
            raise ConfigError(f"{path}: the Globus secrets file must be YAML with client_id and client_secret.")
        return cls(str(data["client_id"]), str(data["client_secret"]))


class GlobusAuthService:
    """The blocking calls to Globus Auth and Groups, on one HTTP transport with short timeouts.

    Each call either answers or raises a ``GatewayError`` that names the service
    and never the token. No retries: a request waits for Globus once, and the
    next request tries again.
    """

    def __init__(self, credentials: ClientCredentials, *, timeout: float, session_policies: frozenset[str]) -> None:
        self._transport = RequestsTransport(http_timeout=timeout)
        self._auth = globus_sdk.ConfidentialAppAuthClient(
            credentials.client_id,
            credentials.client_secret,
            transport=self._transport,
            retry_config=RetryConfig(max_retries=0),
        )
        self._policies = ",".join(sorted(session_policies))

    def introspect(self, token: str) -> dict[str, Any]:
        body = {"token": token, "include": INTROSPECT_INCLUDE}
        if self._policies:
            # oauth2_token_introspect() has no way to add this form field.
            body["authentication_policies"] = self._policies
        refused = AuthenticationFailed("Globus Auth refused to check the access token.")
        with _globus_call("Globus Auth", refused, operator_statuses=(401, 403)):
            answer = self._auth.post("/v2/oauth2/token/introspect", data=body, encoding="form")
        return dict(answer.data) if isinstance(answer.data, dict) else {}

    def groups(self, token: str) -> frozenset[str]:
        """The ids of the groups the token's owner is an active member of."""
        with _globus_call("Globus Auth", _no_groups_consent(), operator_statuses=(401,)):
            dependent = self._auth.oauth2_get_dependent_tokens(token, scope=GROUPS_SCOPE)
        if GROUPS_RESOURCE_SERVER not in dependent.by_resource_server:
            raise _no_groups_consent()
        client = globus_sdk.GroupsClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(
                dependent.by_resource_server[GROUPS_RESOURCE_SERVER]["access_token"]
            ),
            transport=self._transport,
            retry_config=RetryConfig(max_retries=0),
        )
        with _globus_call("Globus Groups", None, operator_statuses=()):
            groups = list(client.get_my_groups(statuses="active"))
        return frozenset(str(group["id"]) for group in groups if _active_member(group))

    def close(self) -> None:
        self._auth.close()
        self._transport.close()


def _active_member(group: dict[str, Any]) -> bool:
    memberships = group.get("my_memberships")
    return memberships is None or any(membership.get("status") == "active" for membership in memberships)


def _no_groups_consent() -> PermissionDenied:
    return PermissionDenied(
        "The gateway could not read your Globus group memberships: your login has not granted it. "
        "Run `inference-auth-token authenticate --force` and accept the consent.",
        code="groups_consent_required",
    )


@contextmanager
def _globus_call(service: str, refused: GatewayError | None, *, operator_statuses: tuple[int, ...]) -> Iterator[None]:
    """Turn Globus' failures into the gateway's errors.

    Unreachable, 429 and 5xx are 503. ``operator_statuses`` mean Globus refused
    the gateway itself (its credentials or registration): 503, and an error in
    the log for the operators. Any other 4xx raises ``refused``, or is treated as
    the operators' problem too when ``refused`` is None.
    """
    try:
        yield
    except globus_sdk.NetworkError as exc:
        log.warning("%s could not be reached: %s", service, type(exc).__name__)
        raise ServiceUnavailable(
            f"{service} cannot be reached, so the access token could not be checked; try again shortly.",
            code="auth_unavailable",
            headers=_TRY_AGAIN,
        ) from None
    except globus_sdk.GlobusAPIError as exc:
        status = exc.http_status
        if status >= 500 or status == 429:
            log.warning("%s answered HTTP %s", service, status)
            raise ServiceUnavailable(
                f"{service} is unavailable (HTTP {status}), so the access token could not be checked; "
                "try again shortly.",
                code="auth_unavailable",
                headers=_TRY_AGAIN,
            ) from None
        if refused is None or status in operator_statuses:
            log.error(
                "%s refused the gateway itself (HTTP %s, %s): check its client id, secret and scopes",
                service,
                status,
                exc.code,
            )
            raise ServiceUnavailable(
                "The gateway cannot check access tokens right now; its operators have been told.",
                code="auth_unavailable",
                headers=_TRY_AGAIN,
            ) from None
        raise refused from None


class GlobusAuthenticator(Authenticator):
    """Globus access tokens, introspected once and then served from the cache."""

    name = "globus"

    def __init__(
        self,
        service: GlobusAuthService,
        policy: AccessPolicy,
        cache: VerdictCache,
        *,
        fetch_groups: bool,
        timeout: float,
        cache_seconds: float,
        refusal_seconds: float,
        workers: int = 8,
        native_client_id: str | None = None,
    ) -> None:
        self.policy = policy
        self.native_client_id = native_client_id
        self.fetch_groups = fetch_groups
        self._service = service
        self._cache = cache
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._refusal_seconds = refusal_seconds
        self._flights = SingleFlight()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="globus-auth")

    @classmethod
    def from_settings(cls, settings: GlobusAuthSettings, *, groups_needed: bool = False) -> GlobusAuthenticator:
        """Build from configuration; ``groups_needed`` says whether endpoint or cluster rules name groups."""
        credentials = ClientCredentials.load(settings)
        policy = AccessPolicy.build(
            settings.scope or default_scope(credentials.client_id),
            session_policies=settings.session_policies,
            allowed_domains=settings.allowed_domains,
            required_groups=settings.required_groups,
            service_accounts=settings.service_accounts,
        )
        fetch_groups = (groups_needed or policy.uses_groups) if settings.fetch_groups is None else settings.fetch_groups
        cache_settings = settings.cache
        redis_url = cache_settings.resolved_redis_url()
        cache = (
            RedisVerdictCache.from_url(
                redis_url,
                f"{cache_settings.redis_prefix}{_fingerprint(policy, fetch_groups)}:",
                cache_settings.max_entries,
            )
            if redis_url
            else VerdictCache(cache_settings.max_entries)
        )
        return cls(
            GlobusAuthService(credentials, timeout=settings.timeout, session_policies=policy.session_policies),
            policy,
            cache,
            fetch_groups=fetch_groups,
            timeout=settings.timeout,
            cache_seconds=cache_settings.seconds,
            refusal_seconds=cache_settings.refusal_seconds,
            native_client_id=settings.native_client_id,
        )

    async def authenticate(self, token: str) -> Identity:
        key = token_key(token)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = await self._settle(token, key)
        return verdict.outcome()

    def browser_login(self) -> dict[str, Any] | None:
        if not self.native_client_id:
            return None
        return {
            "authorize_url": globus_sdk.config.get_service_url("auth") + "v2/oauth2/authorize",
            "client_id": self.native_client_id,
            "scope": self.policy.scope,
            "session_required_policies": ",".join(sorted(self.policy.session_policies)),
        }

    async def redeem_code(self, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        client_id = self.native_client_id
        assert client_id is not None
        # The code is the native app's: the gateway redeems it as that public client (no secret), so that the
        # browser needs no cross-origin call to Globus; the refresh token, if any, is not handed on.
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
        }
        refused = AuthenticationFailed("Globus Auth did not accept the login; log in again.", code="login_refused")

        def redeem() -> globus_sdk.OAuthTokenResponse:
            client = globus_sdk.NativeAppAuthClient(client_id, transport=RequestsTransport(http_timeout=self._timeout))
            with _globus_call("Globus Auth", refused, operator_statuses=()):
                return client.oauth2_token(form)

        tokens = await asyncio.get_running_loop().run_in_executor(self._pool, redeem)
        for token in tokens.by_resource_server.values():
            if self.policy.scope in str(token.get("scope", "")).split():
                expires_in = int(token["expires_at_seconds"] - time.time())
                return {"access_token": token["access_token"], "expires_in": expires_in}
        raise AuthenticationFailed("Globus Auth did not grant the gateway's scope.", code="login_refused")

    async def close(self) -> None:
        await self._flights.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self._cache.close()
        self._service.close()

    async def _settle(self, token: str, key: str) -> Verdict:
        flight = self._flights.join(key, lambda: self._look_up(token, key))
        try:
            return await asyncio.wait_for(asyncio.shield(flight), self._timeout)
        except TimeoutError:
            raise ServiceUnavailable(
                f"Globus Auth did not answer within {self._timeout:g} s, so the access token could not be "
                "checked; try again shortly.",
                code="auth_unavailable",
                headers=_TRY_AGAIN,
            ) from None

    async def _look_up(self, token: str, key: str) -> Verdict:
        shared = await self._cache.load(key)
        if shared is not None:
            return shared
        verdict = await asyncio.get_running_loop().run_in_executor(self._pool, self._decide, token)
        await self._cache.store(key, verdict)
        return verdict

    def _decide(self, token: str) -> Verdict:
        """Ask Globus about ``token`` (blocking); refusals become short-lived verdicts, outages raise 503."""
        now = time.time()
        try:
            info = self._service.introspect(token)
            identity = self.policy.admit(info, now)
            if self.fetch_groups:
                identity = dataclasses.replace(identity, groups=self._service.groups(token))
            self.policy.require_groups(identity)
        except (AuthenticationFailed, PermissionDenied) as refusal:
            return Verdict(expires_at=now + self._refusal_seconds, refusal=Refusal.of(refusal))
        lifetime = self._cache_seconds
        expires = info.get("exp")
        if isinstance(expires, int | float):
            lifetime = min(lifetime, expires - now)
        return Verdict(expires_at=now + lifetime, identity=identity)


def _fingerprint(policy: AccessPolicy, fetch_groups: bool) -> str:
    """A short digest of the rules, so that replicas share verdicts only when they judge alike."""
    facts = [
        policy.scope,
        sorted(policy.session_policies),
        sorted(policy.allowed_domains),
        sorted(policy.required_groups),
        sorted(policy.service_accounts),
        fetch_groups,
    ]
    return hashlib.sha256(orjson.dumps(facts)).hexdigest()[:12]
