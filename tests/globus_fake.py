"""A local stand-in for Globus Auth and Groups, speaking the HTTP the gateway and the CLI use.

It implements, on one loopback port:

- ``POST /v2/oauth2/token/introspect``: RFC 7662 with Globus' fields (``identity_set``,
  ``identity_set_detail``, ``session_info``, ``policy_evaluations``), for the gateway's
  confidential client (HTTP Basic);
- ``POST /v2/oauth2/token``: the dependent-token grant (confidential client), and the
  authorization-code (with PKCE) and refresh-token grants of a native app;
- ``POST /v2/oauth2/token/revoke``;
- ``GET /v2/oauth2/authorize``: what the user's browser does, answered with a redirect
  that carries the code, as Globus' code page would show it;
- ``GET /v2/groups/my_groups`` for a dependent Groups token.

The real ``globus-sdk`` is pointed at it with ``GLOBUS_SDK_SERVICE_URL_AUTH`` and
``GLOBUS_SDK_SERVICE_URL_GROUPS`` (see ``env()``). Every call is counted by name in
``calls``; ``fail`` makes an endpoint answer an error status and ``delay`` slows all of them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

GATEWAY_CLIENT_ID = "7d1ee7c4-0000-4000-8000-00000000ca11"
GATEWAY_CLIENT_SECRET = "fake-gateway-secret"
NATIVE_CLIENT_ID = "3b5f1a9e-0000-4000-8000-0000000c11e0"
SCOPE = f"https://auth.globus.org/scopes/{GATEWAY_CLIENT_ID}/action_all"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
CLIENT_DOMAIN = "clients.auth.globus.org"


@dataclass
class Person:
    """One Globus identity."""

    username: str
    name: str = ""
    sub: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def idp(self) -> str:
        # One identity provider per domain, with a stable id.
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, self.username.rpartition("@")[2]))

    def detail(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "username": self.username,
            "name": self.name or None,
            "email": self.username if "@" in self.username else None,
            "identity_provider": self.idp,
            "identity_provider_display_name": self.username.rpartition("@")[2],
            "organization": None,
            "status": "used",
        }


@dataclass
class Grant:
    """An access token and what Globus knows about it."""

    token: str
    person: Person
    linked: list[Person]
    session: list[str]
    scope: str
    expires_at: float
    client_id: str
    policies: set[str]
    groups: list[str]
    groups_consent: bool = True
    revoked: bool = False
    refresh_token: str | None = None


@dataclass
class Login:
    """Who signs in when the browser visits the authorize URL."""

    username: str = "jdoe@anl.gov"
    name: str = "Jane Doe"
    groups: list[str] = field(default_factory=list)
    lifetime: float = 172_800


class FakeGlobus:
    """Globus Auth and Groups on ``http://127.0.0.1:<port>/``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, int] = {}
        self.delay = 0.0
        self.login = Login()
        self.authorize_params: list[dict[str, str]] = []
        self._grants: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}
        self._groups_tokens: dict[str, Grant] = {}
        self._codes: dict[str, tuple[dict[str, str], Login]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        """What points the real globus-sdk at this server."""
        return {"GLOBUS_SDK_SERVICE_URL_AUTH": self.url, "GLOBUS_SDK_SERVICE_URL_GROUPS": self.url}

    def gateway_env(self) -> dict[str, str]:
        """The SDK's service URLs and the gateway's client credentials."""
        return {
            **self.env(),
            "INFERENCE_GATEWAY_GLOBUS_CLIENT_ID": GATEWAY_CLIENT_ID,
            "INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET": GATEWAY_CLIENT_SECRET,
        }

    def start(self) -> FakeGlobus:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-globus", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeGlobus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- tokens the tests hand out ------------------------------------------------------------------------------

    def issue(
        self,
        username: str = "jdoe@anl.gov",
        *,
        name: str = "Jane Doe",
        groups: tuple[str, ...] | list[str] = (),
        scope: str = SCOPE,
        lifetime: float = 3600,
        linked: tuple[str, ...] = (),
        session: tuple[str, ...] | None = None,
        policies: tuple[str, ...] = (),
        client_id: str = NATIVE_CLIENT_ID,
        groups_consent: bool = True,
    ) -> str:
        """A new access token for ``username``.

        ``linked`` are other usernames in the same identity set; ``session`` names
        the usernames the user logged in with (default: ``username``);
        ``policies`` are the session policies the session satisfies.
        """
        person = Person(username, name)
        others = [Person(other) for other in linked]
        everyone = {identity.username: identity for identity in [person, *others]}
        logged_in = [everyone[user].sub for user in (session if session is not None else (username,))]
        grant = Grant(
            token=_new_token(),
            person=person,
            linked=others,
            session=logged_in,
            scope=scope,
            expires_at=time.time() + lifetime,
            client_id=client_id,
            policies=set(policies),
            groups=list(groups),
            groups_consent=groups_consent,
        )
        with self._lock:
            self._grants[grant.token] = grant
        return grant.token

    def service_account_token(self, client_id: str, *, scope: str = SCOPE) -> str:
        """A client-credentials token of the service account ``client_id``."""
        person = Person(f"{client_id}@{CLIENT_DOMAIN}", "robot", sub=client_id)
        grant = Grant(
            token=_new_token(),
            person=person,
            linked=[],
            session=[],
            scope=scope,
            expires_at=time.time() + 3600,
            client_id=client_id,
            policies=set(),
            groups=[],
        )
        with self._lock:
            self._grants[grant.token] = grant
        return grant.token

    def revoke(self, token: str) -> None:
        with self._lock:
            grant = self._grants.get(token) or self._refresh.get(token)
            if grant is not None:
                grant.revoked = True

    def expire(self, token: str) -> None:
        with self._lock:
            self._grants[token].expires_at = time.time() - 1

    def active(self, token: str) -> bool:
        with self._lock:
            grant = self._grants.get(token)
            return grant is not None and not grant.revoked and grant.expires_at > time.time()

    # --- the HTTP side ------------------------------------------------------------------------------------------

    def answer(self, method: str, path: str, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        """(status, body, headers) for one request; runs on the server's threads."""
        name = _ENDPOINTS.get((method, path))
        if name is None and method == "POST" and path == "/v2/oauth2/token":
            name = _GRANTS.get(form.get("grant_type", ""), "token")
        if name is None:
            return 404, {"error": "not_found"}, {}
        with self._lock:
            self.calls[name] += 1
        if self.delay:
            time.sleep(self.delay)
        if name in self.fail:
            return self.fail[name], {"errors": [{"code": "Error", "status": self.fail[name]}]}, {}
        with self._lock:
            return getattr(self, f"_on_{name}")(query, form, auth)

    def _confidential(self, auth: str) -> bool:
        expected = base64.b64encode(f"{GATEWAY_CLIENT_ID}:{GATEWAY_CLIENT_SECRET}".encode()).decode()
        return auth == f"Basic {expected}"

    def _on_introspect(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        if not self._confidential(auth):
            return 401, {"error": "invalid_client"}, {}
        grant = self._grants.get(form.get("token", ""))
        now = time.time()
        if grant is None or grant.revoked or grant.expires_at <= now:
            return 200, {"active": False}, {}
        identities = [grant.person, *grant.linked]
        body: dict[str, Any] = {
            "active": True,
            "scope": grant.scope,
            "client_id": grant.client_id,
            "sub": grant.person.sub,
            "username": grant.person.username,
            "name": grant.person.name or None,
            "email": grant.person.username,
            "aud": [GATEWAY_CLIENT_ID],
            "iss": "https://auth.globus.org",
            "exp": int(grant.expires_at),
            "iat": int(now),
            "nbf": int(now),
            "identity_set": [identity.sub for identity in identities],
        }
        include = set(form.get("include", "").split(","))
        if "identity_set_detail" in include:
            body["identity_set_detail"] = [identity.detail() for identity in identities]
        if "session_info" in include:
            by_sub = {identity.sub: identity for identity in identities}
            body["session_info"] = {
                "session_id": str(uuid.uuid5(uuid.NAMESPACE_URL, grant.token)),
                "authentications": {
                    sub: {
                        "idp": by_sub[sub].idp,
                        "auth_time": int(now) - 60,
                        "acr": None,
                        "amr": None,
                        "custom_claims": {},
                    }
                    for sub in grant.session
                },
            }
        if form.get("authentication_policies"):
            body["policy_evaluations"] = {
                policy: {"evaluation": policy in grant.policies}
                for policy in form["authentication_policies"].split(",")
            }
        return 200, body, {}

    def _on_dependent_token(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        if not self._confidential(auth):
            return 401, {"error": "invalid_client"}, {}
        grant = self._grants.get(form.get("token", ""))
        if grant is None or grant.revoked or grant.expires_at <= time.time():
            return 400, {"error": "invalid_grant", "error_description": "token is not active"}, {}
        if not grant.groups_consent:
            return 200, [], {}
        groups_token = _new_token()
        self._groups_tokens[groups_token] = grant
        return (
            200,
            [
                {
                    "access_token": groups_token,
                    "expires_in": 172_800,
                    "resource_server": "groups.api.globus.org",
                    "scope": GROUPS_SCOPE,
                    "token_type": "Bearer",
                }
            ],
            {},
        )

    def _on_my_groups(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        grant = self._groups_tokens.get(auth.removeprefix("Bearer "))
        if grant is None:
            return 401, {"code": "AUTHENTICATION_ERROR"}, {}
        membership = {
            "identity_id": grant.person.sub,
            "username": grant.person.username,
            "status": "active",
            "role": "member",
        }
        return (
            200,
            [
                {"id": group, "name": f"group {group}", "group_type": "regular", "my_memberships": [membership]}
                for group in grant.groups
            ],
            {},
        )

    def _on_authorize(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        self.authorize_params.append(dict(query))
        code = secrets.token_urlsafe(16)
        self._codes[code] = (dict(query), Login(**vars(self.login)))
        location = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query.get('state', '')})}"
        return 302, {}, {"Location": location}

    def _on_authorization_code(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        issued = self._codes.pop(form.get("code", ""), None)
        if issued is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown code"}, {}
        params, login = issued
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if (
            form.get("client_id") != params.get("client_id")
            or form.get("redirect_uri") != params.get("redirect_uri")
            or challenge != params.get("code_challenge")
        ):
            return 400, {"error": "invalid_grant", "error_description": "code_verifier does not match"}, {}
        grant = self._grant_for(login, params["scope"], params["client_id"])
        if params.get("access_type") == "offline":
            grant.refresh_token = _new_token()
            self._refresh[grant.refresh_token] = grant
        return 200, _token_response(grant), {}

    def _on_refresh(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        old = self._refresh.get(form.get("refresh_token", ""))
        if old is None or old.revoked or form.get("client_id") != old.client_id:
            return 400, {"error": "invalid_grant", "error_description": "refresh token is not valid"}, {}
        login = Login(old.person.username, old.person.name, old.groups, self.login.lifetime)
        grant = self._grant_for(login, old.scope, old.client_id)
        grant.refresh_token = old.refresh_token
        return 200, _token_response(grant), {}

    def _on_revoke(self, query: dict[str, str], form: dict[str, str], auth: str) -> Any:
        grant = self._grants.get(form.get("token", ""))
        if grant is not None:
            grant.revoked = True
        refreshed = self._refresh.get(form.get("token", ""))
        if refreshed is not None:
            refreshed.revoked = True
            del self._refresh[form["token"]]
        return 200, {"active": False}, {}

    def _grant_for(self, login: Login, scope: str, client_id: str) -> Grant:
        person = Person(login.username, login.name)
        grant = Grant(
            token=_new_token(),
            person=person,
            linked=[],
            session=[person.sub],
            scope=scope,
            expires_at=time.time() + login.lifetime,
            client_id=client_id,
            policies=set(),
            groups=list(login.groups),
        )
        self._grants[grant.token] = grant
        return grant


_ENDPOINTS = {
    ("POST", "/v2/oauth2/token/introspect"): "introspect",
    ("POST", "/v2/oauth2/token/revoke"): "revoke",
    ("GET", "/v2/oauth2/authorize"): "authorize",
    ("GET", "/v2/groups/my_groups"): "my_groups",
}
_GRANTS = {
    "urn:globus:auth:grant_type:dependent_token": "dependent_token",
    "authorization_code": "authorization_code",
    "refresh_token": "refresh",
}


def _new_token() -> str:
    return "Ag" + secrets.token_urlsafe(40)


def _token_response(grant: Grant) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": grant.token,
        "expires_in": int(grant.expires_at - time.time()),
        "resource_server": GATEWAY_CLIENT_ID,
        "scope": grant.scope,
        "token_type": "Bearer",
        "other_tokens": [],
        "state": "_default",
    }
    if grant.refresh_token:
        body["refresh_token"] = grant.refresh_token
    return body


def _handler(fake: FakeGlobus) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            form = {key: values[-1] for key, values in parse_qs(raw).items()}
            status, body, headers = fake.answer(method, parts.path, query, form, self.headers.get("authorization", ""))
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            # The client may have given up waiting, as the slow-Globus tests make it do.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
