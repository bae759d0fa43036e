"""Against the real Globus Auth: runs only where a deployment's credentials and a user's token are in the environment.

export INFERENCE_GATEWAY_GLOBUS_CLIENT_ID=...       # the gateway's confidential client
export INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET=...
export INFERENCE_GATEWAY_LIVE_GLOBUS_TOKEN=$(inference-auth-token get_access_token)
export INFERENCE_GATEWAY_LIVE_GLOBUS_SCOPE=...      # optional; the gateway's default scope otherwise
.venv/bin/pytest tests/live
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from gateway.auth.globus import GlobusAuthenticator
from gateway.config import GlobusAuthSettings
from gateway.errors import AuthenticationFailed

NEEDED = (
    "INFERENCE_GATEWAY_GLOBUS_CLIENT_ID",
    "INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET",
    "INFERENCE_GATEWAY_LIVE_GLOBUS_TOKEN",
)
MISSING = [name for name in NEEDED if not os.environ.get(name)]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"live Globus test: set {', '.join(MISSING)} to run it against the real Globus Auth"
)


@pytest.fixture
async def authenticator() -> AsyncIterator[GlobusAuthenticator]:
    settings = GlobusAuthSettings(scope=os.environ.get("INFERENCE_GATEWAY_LIVE_GLOBUS_SCOPE"), fetch_groups=True)
    live = GlobusAuthenticator.from_settings(settings)
    yield live
    await live.close()


async def test_a_real_token_is_introspected_with_its_groups(authenticator: GlobusAuthenticator) -> None:
    identity = await authenticator.authenticate(os.environ["INFERENCE_GATEWAY_LIVE_GLOBUS_TOKEN"])
    assert identity.provider == "globus" and "@" in identity.username and identity.subject in identity.identity_set


async def test_a_made_up_token_is_401(authenticator: GlobusAuthenticator) -> None:
    with pytest.raises(AuthenticationFailed):
        await authenticator.authenticate("AgThisIsNotARealGlobusToken0123456789")
