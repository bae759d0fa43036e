"""What the gateway hands its users to download: the ``inference-auth-token`` command, filled in for itself."""

from __future__ import annotations

import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from gateway.api.responses import api_handler
from gateway.runtime import Runtime

_TOKEN_COMMAND = "token_cli.py"


def _filled_in(text: str, values: dict[str, object]) -> str:
    """``text`` with each top-level ``NAME = ...`` line of ``values`` set to the value's Python literal."""
    for name, value in values.items():
        line = re.compile(rf"^{name}(?P<annotation>(?::[^=]+)?) = .*$", re.MULTILINE)
        match = line.search(text)
        assert match is not None, f"{_TOKEN_COMMAND} has no line {name} = ..."
        text = f"{text[: match.start()]}{name}{match['annotation']} = {value!r}{text[match.end() :]}"
    return text


def token_command_settings(runtime: Runtime, gateway_url: str) -> dict[str, object]:
    """The values the served command starts with: this gateway's Globus login, or word that it takes dev tokens."""
    values: dict[str, object] = {
        "GATEWAY_URL": gateway_url,
        "GATEWAY_USES_GLOBUS": "globus" in runtime.config.auth.providers,
    }
    # The browser login names the native app users log in with; without one the placeholders stay, and the
    # command says what to set.
    login = runtime.authenticator.browser_login()
    if login is not None:
        values["DEFAULT_CLIENT_ID"] = login["client_id"]
        values["DEFAULT_SCOPE"] = login["scope"]
        values["DEFAULT_POLICIES"] = tuple(policy for policy in login["session_required_policies"].split(",") if policy)
    return values


@api_handler
async def token_command(request: Request) -> Response:
    """``GET /resource_server/inference-auth-token.py``: the command as one file that needs only ``globus-sdk``."""
    runtime: Runtime = request.app.state.runtime
    text = resources.files("gateway.auth").joinpath(_TOKEN_COMMAND).read_text()
    gateway_url = str(request.base_url).rstrip("/")
    body = _filled_in(text, token_command_settings(runtime, gateway_url))
    return Response(
        body,
        media_type="text/x-python",
        headers={"content-disposition": 'attachment; filename="inference-auth-token.py"'},
    )
