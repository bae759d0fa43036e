#!/usr/bin/env python3
"""The ``inference-auth-token`` command: log in to Globus for the gateway and print access tokens.

    inference-auth-token authenticate [--force]
    inference-auth-token get_access_token
    inference-auth-token get_time_until_token_expiration [--units seconds|minutes|hours]
    inference-auth-token revoke

It is a Globus native app (no client secret): ``authenticate`` prints a Globus
login URL, reads the authorization code the browser shows, and stores the access
and refresh tokens in ``~/.globus/app/<client id>/<app name>/tokens.json`` (mode
0600, the globus-sdk's JSON format). ``get_access_token`` prints a valid access
token, refreshing it first when it is about to expire.

This file is the whole command: it imports only the standard library and
``globus_sdk``, so that it runs alone with nothing else installed
(``pip install globus-sdk``). ``scripts/inference-auth-token.py`` is a link to
it, and a gateway serves it at ``/resource_server/inference-auth-token.py`` with
the settings below filled in for itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import globus_sdk
from globus_sdk.gare import GlobusAuthorizationParameters
from globus_sdk.login_flows import CommandLineLoginFlowManager
from globus_sdk.login_flows.command_line_login_flow_manager import CommandLineLoginFlowEOFError
from globus_sdk.token_storage import JSONTokenStorage, TokenStorageData
from globus_sdk.transport import RequestsTransport, RetryConfig

# Placeholders: a deployment publishes its own native-app client id and gateway scope, or its users set the
# variables below. The gateway that serves this file fills in these five lines for itself.
PLACEHOLDER_ID = "00000000-0000-0000-0000-000000000000"
DEFAULT_CLIENT_ID = PLACEHOLDER_ID
DEFAULT_SCOPE = f"https://auth.globus.org/scopes/{PLACEHOLDER_ID}/action_all"
DEFAULT_POLICIES: tuple[str, ...] = ()
GATEWAY_URL = ""
GATEWAY_USES_GLOBUS = True
DEFAULT_APP_NAME = "inference-gateway"

CLIENT_ID_ENV = "INFERENCE_AUTH_CLIENT_ID"
SCOPE_ENV = "INFERENCE_GATEWAY_SCOPE"
APP_NAME_ENV = "INFERENCE_AUTH_APP_NAME"
POLICIES_ENV = "INFERENCE_AUTH_SESSION_POLICIES"
DOMAINS_ENV = "INFERENCE_AUTH_DOMAINS"

# A token this close to its expiry is refreshed before it is printed, so a request sent with it does not fail.
REFRESH_MARGIN_SECONDS = 60
UNITS = {"seconds": 1, "minutes": 60, "hours": 3600}


class CommandError(Exception):
    """A failure to report to the user as one message, without a traceback."""


class NotLoggedIn(CommandError):
    pass


@dataclass(frozen=True)
class Settings:
    client_id: str
    scope: str
    app_name: str
    policies: tuple[str, ...]
    domains: tuple[str, ...]

    @property
    def token_file(self) -> Path:
        return Path.home() / ".globus" / "app" / self.client_id / self.app_name / "tokens.json"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        settings = cls(
            client_id=args.client_id or os.environ.get(CLIENT_ID_ENV) or DEFAULT_CLIENT_ID,
            scope=args.scope or os.environ.get(SCOPE_ENV) or DEFAULT_SCOPE,
            app_name=args.app_name or os.environ.get(APP_NAME_ENV) or DEFAULT_APP_NAME,
            policies=tuple(args.policy or _listed(os.environ.get(POLICIES_ENV)) or DEFAULT_POLICIES),
            domains=tuple(args.domain or _listed(os.environ.get(DOMAINS_ENV))),
        )
        if PLACEHOLDER_ID not in settings.client_id and PLACEHOLDER_ID not in settings.scope:
            return settings
        if not GATEWAY_USES_GLOBUS:
            raise CommandError(
                f"The gateway at {GATEWAY_URL} takes dev tokens, not Globus logins: there is nothing to log in to. "
                "On the gateway's machine, `inference-gateway dev-token` prints the token (or ask its operator "
                "for it); then export MY_TOKEN=<the token>."
            )
        raise CommandError(
            "This copy of inference-auth-token does not know your gateway's Globus client id and scope: "
            f"set {CLIENT_ID_ENV} and {SCOPE_ENV} (or pass --client-id and --scope) to the values your "
            "gateway's operators publish, or download the command from your gateway, filled in for it: "
            "https://<gateway>/resource_server/inference-auth-token.py. (A gateway with dev tokens, such as the "
            "embedded default, needs no login: `inference-gateway dev-token` prints its token.)"
        )


def _listed(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


class TokenStore:
    """The user's tokens for one app, in a file only they can read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.parent.chmod(0o700)
        self._storage = JSONTokenStorage(path)

    def find(self, scope: str) -> TokenStorageData | None:
        """The stored tokens whose scopes include ``scope``."""
        if not self.path.exists():
            return None
        for data in self._storage.get_token_data_by_resource_server().values():
            if scope in data.scope.split():
                return data
        return None

    def save(self, tokens: globus_sdk.OAuthTokenResponse, keep_refresh: str | None = None) -> None:
        """Store every token of a grant; ``keep_refresh`` stands in when the grant returns no refresh token."""
        self._storage.store_token_data_by_resource_server(
            {
                server: TokenStorageData(
                    resource_server=server,
                    identity_id=None,
                    scope=token["scope"],
                    access_token=token["access_token"],
                    refresh_token=token.get("refresh_token") or keep_refresh,
                    expires_at_seconds=int(token["expires_at_seconds"]),
                    token_type=token.get("token_type"),
                )
                for server, token in tokens.by_resource_server.items()
            }
        )
        # The SDK sets a private umask only when it creates the file; make sure of it either way.
        self.path.chmod(stat.S_IRUSR | stat.S_IWUSR)

    def forget(self, data: TokenStorageData) -> None:
        self._storage.remove_token_data(data.resource_server)


class TokenClient:
    """What the command asks Globus Auth, as the native app ``settings.client_id``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = TokenStore(settings.token_file)
        self.auth = globus_sdk.NativeAppAuthClient(
            settings.client_id,
            app_name=settings.app_name,
            transport=RequestsTransport(http_timeout=30),
            retry_config=RetryConfig(max_retries=2, max_sleep=2),
        )

    def access_token(self) -> TokenStorageData:
        """Stored tokens with an access token good for a while yet, refreshed and stored again when needed."""
        data = self.store.find(self.settings.scope)
        if data is None:
            raise NotLoggedIn(
                f"Not logged in: there are no tokens for this gateway in {self.store.path}. "
                "Run `inference-auth-token authenticate` first."
            )
        if data.expires_at_seconds - time.time() > REFRESH_MARGIN_SECONDS:
            return data
        if not data.refresh_token:
            raise NotLoggedIn(
                "The stored access token has expired and there is no refresh token to renew it. "
                "Run `inference-auth-token authenticate` to log in again."
            )
        try:
            with _globus_errors():
                tokens = self.auth.oauth2_refresh_token(data.refresh_token)
        except globus_sdk.AuthAPIError:
            self.store.forget(data)
            raise NotLoggedIn(
                "Your Globus refresh token has expired or was revoked (refresh tokens lapse after six months "
                "unused, and when you log out or revoke them). Run `inference-auth-token authenticate` to log in "
                "again."
            ) from None
        self.store.save(tokens, keep_refresh=data.refresh_token)
        refreshed = self.store.find(self.settings.scope)
        assert refreshed is not None
        return refreshed

    def login(self, *, force: bool) -> TokenStorageData:
        """The native-app login: print the URL, read the code, store the tokens (refresh tokens included)."""
        manager = CommandLineLoginFlowManager(
            self.auth, request_refresh_tokens=True, native_prefill_named_grant=_grant_label(self.settings.app_name)
        )
        parameters = GlobusAuthorizationParameters(
            required_scopes=[self.settings.scope],
            session_required_policies=list(self.settings.policies) or None,
            session_required_single_domain=list(self.settings.domains) or None,
            prompt="login" if force else None,
        )
        try:
            with _globus_errors():
                tokens = manager.run_login_flow(parameters)
        except CommandLineLoginFlowEOFError:
            raise CommandError(
                "No authorization code was entered: run `inference-auth-token authenticate` in an interactive "
                "terminal, open the URL it prints, and paste the code Globus shows."
            ) from None
        except globus_sdk.AuthAPIError:
            raise CommandError(
                "Globus Auth did not accept the authorization code. Run `inference-auth-token authenticate` "
                "again and paste the code from that same login."
            ) from None
        self.store.save(tokens)
        data = self.store.find(self.settings.scope)
        if data is None:
            raise CommandError(
                f"Globus Auth did not grant the gateway's scope ({self.settings.scope}); check --scope or {SCOPE_ENV}."
            )
        return data

    def revoke(self, data: TokenStorageData) -> None:
        with _globus_errors():
            self.auth.oauth2_revoke_token(data.access_token)
            if data.refresh_token:
                self.auth.oauth2_revoke_token(data.refresh_token)
        self.store.forget(data)


@contextmanager
def _globus_errors() -> Iterator[None]:
    """Network failures and Globus Auth outages become ``CommandError``s that say what to do next."""
    try:
        yield
    except globus_sdk.NetworkError as exc:
        raise CommandError(
            f"Cannot reach Globus Auth ({type(exc).__name__}). Check your network connection (and any proxy "
            "settings) and try again."
        ) from None
    except globus_sdk.GlobusAPIError as exc:
        if exc.http_status >= 500 or exc.http_status == 429:
            raise CommandError(
                f"Globus Auth is unavailable right now (HTTP {exc.http_status}); try again in a few minutes."
            ) from None
        raise


def _grant_label(app_name: str) -> str:
    host = socket.gethostname().split(".")[0]
    return f"{app_name} on {host}" if host else app_name


def _expires_in(data: TokenStorageData) -> str:
    seconds = max(0, int(data.expires_at_seconds - time.time()))
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min"


# --- the commands ------------------------------------------------------------------------------------------------


def _authenticate(client: TokenClient, args: argparse.Namespace) -> int:
    existing = client.store.find(client.settings.scope)
    if existing is not None and args.force:
        print("Logging out first: revoking the stored tokens.", file=sys.stderr)
        client.revoke(existing)
    elif existing is not None:
        try:
            data = client.access_token()
        except NotLoggedIn:
            pass
        else:
            print(
                f"Already logged in; the access token is valid for {_expires_in(data)}. "
                "Use `authenticate --force` to log in again (for example as someone else).",
                file=sys.stderr,
            )
            return 0
    data = client.login(force=args.force)
    print(
        f"Logged in. Tokens are stored in {client.store.path}; the access token is valid for {_expires_in(data)} "
        "and is renewed with the refresh token when you run `get_access_token`.",
        file=sys.stderr,
    )
    return 0


def _get_access_token(client: TokenClient, args: argparse.Namespace) -> int:
    print(client.access_token().access_token)
    return 0


def _get_time_until_token_expiration(client: TokenClient, args: argparse.Namespace) -> int:
    data = client.store.find(client.settings.scope)
    if data is None:
        raise NotLoggedIn("Not logged in. Run `inference-auth-token authenticate` first.")
    print(round((data.expires_at_seconds - time.time()) / UNITS[args.units], 2))
    return 0


def _revoke(client: TokenClient, args: argparse.Namespace) -> int:
    data = client.store.find(client.settings.scope)
    if data is None:
        print("Not logged in; there is nothing to revoke.", file=sys.stderr)
        return 0
    client.revoke(data)
    print(f"Tokens revoked with Globus Auth and removed from {client.store.path}.", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--client-id", help=f"the native app's Globus client id (default: ${CLIENT_ID_ENV})")
    common.add_argument("--scope", help=f"the gateway's scope (default: ${SCOPE_ENV})")
    common.add_argument("--app-name", help=f"names the token folder (default: ${APP_NAME_ENV} or {DEFAULT_APP_NAME})")
    common.add_argument(
        "--policy", action="append", help=f"a Globus session policy the login must meet (default: ${POLICIES_ENV})"
    )
    common.add_argument(
        "--domain", action="append", help=f"an identity-provider domain to log in with (default: ${DOMAINS_ENV})"
    )

    parser = argparse.ArgumentParser(
        prog="inference-auth-token", description="Globus login and access tokens for the inference gateway."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    login = commands.add_parser("authenticate", parents=[common], help="log in with Globus and store the tokens")
    login.add_argument("-f", "--force", action="store_true", help="log out first, then log in again")
    login.set_defaults(run=_authenticate)
    get = commands.add_parser("get_access_token", parents=[common], help="print a valid access token")
    get.set_defaults(run=_get_access_token)
    left = commands.add_parser(
        "get_time_until_token_expiration", parents=[common], help="print how long the stored access token lasts"
    )
    left.add_argument("--units", choices=list(UNITS), default="seconds")
    left.set_defaults(run=_get_time_until_token_expiration)
    revoke = commands.add_parser("revoke", parents=[common], help="revoke the stored tokens and delete them")
    revoke.set_defaults(run=_revoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = TokenClient(Settings.from_args(args))
        return int(args.run(client, args))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
