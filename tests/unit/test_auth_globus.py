"""The Globus authenticator in this process, with the real globus-sdk against the local Globus stand-in."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from compute_functions.model_server import free_port
from gateway.auth.globus import ClientCredentials, GlobusAuthenticator
from gateway.config import ConfigError, GlobusAuthSettings
from gateway.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from tests.globus_fake import GATEWAY_CLIENT_ID, GATEWAY_CLIENT_SECRET, FakeGlobus

Build = Callable[..., GlobusAuthenticator]


@pytest.fixture
def fake() -> Iterator[FakeGlobus]:
    with FakeGlobus() as server:
        yield server


@pytest.fixture
async def build(fake: FakeGlobus, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Build]:
    """Makes authenticators from settings, with the SDK pointed at ``fake``; closes them afterwards."""
    for name, value in fake.gateway_env().items():
        monkeypatch.setenv(name, value)
    made: list[GlobusAuthenticator] = []

    def make(**settings: Any) -> GlobusAuthenticator:
        authenticator = GlobusAuthenticator.from_settings(GlobusAuthSettings.model_validate(settings))
        made.append(authenticator)
        return authenticator

    yield make
    for authenticator in made:
        await authenticator.close()


async def test_valid_token_is_introspected_once_then_cached(fake: FakeGlobus, build: Build) -> None:
    auth = build(required_groups=["g-science"])
    token = fake.issue("jdoe@anl.gov", groups=["g-science", "g-other"])
    identity = await auth.authenticate(token)
    assert identity.username == "jdoe@anl.gov" and identity.idp_domain == "anl.gov"
    assert identity.groups == {"g-science", "g-other"} and identity.provider == "globus"
    assert await auth.authenticate(token) is identity
    assert fake.calls == {"introspect": 1, "dependent_token": 1, "my_groups": 1}


async def test_groups_are_read_only_when_a_rule_needs_them(fake: FakeGlobus, build: Build) -> None:
    identity = await build().authenticate(fake.issue(groups=["g-1"]))
    assert identity.groups == frozenset() and fake.calls == {"introspect": 1}
    identity = await build(fetch_groups=True).authenticate(fake.issue(groups=["g-1"]))
    assert identity.groups == {"g-1"}


async def test_concurrent_requests_with_a_new_token_share_one_introspection(fake: FakeGlobus, build: Build) -> None:
    auth = build()
    fake.delay = 0.2
    token = fake.issue()
    identities = await asyncio.gather(*(auth.authenticate(token) for _ in range(200)))
    assert len({identity.subject for identity in identities}) == 1
    assert fake.calls["introspect"] == 1


async def test_refusals_are_cached_briefly(fake: FakeGlobus, build: Build) -> None:
    auth = build(cache={"refusal_seconds": 0.3})
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate("AgNotAToken")
    assert fake.calls["introspect"] == 1
    await asyncio.sleep(0.35)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate("AgNotAToken")
    assert fake.calls["introspect"] == 2


async def test_cache_lasts_no_longer_than_the_token(fake: FakeGlobus, build: Build) -> None:
    auth = build(cache={"seconds": 600})
    token = fake.issue(lifetime=1.2)
    await auth.authenticate(token)
    await asyncio.sleep(1.3)
    with pytest.raises(AuthenticationFailed) as raised:
        await auth.authenticate(token)
    assert raised.value.status == 401 and fake.calls["introspect"] == 2


async def test_revoked_token_works_until_its_entry_ends(fake: FakeGlobus, build: Build) -> None:
    auth = build(cache={"seconds": 0.5})
    token = fake.issue()
    await auth.authenticate(token)
    fake.revoke(token)
    await auth.authenticate(token)
    await asyncio.sleep(0.55)
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate(token)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_globus_errors_are_503_and_not_cached(fake: FakeGlobus, build: Build, status: int) -> None:
    auth = build()
    token = fake.issue()
    fake.fail["introspect"] = status
    with pytest.raises(ServiceUnavailable) as raised:
        await auth.authenticate(token)
    assert raised.value.code == "auth_unavailable" and raised.value.headers["retry-after"]
    del fake.fail["introspect"]
    assert (await auth.authenticate(token)).username == "jdoe@anl.gov"


async def test_groups_outage_is_503(fake: FakeGlobus, build: Build) -> None:
    auth = build(required_groups=["g"])
    fake.fail["my_groups"] = 503
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate(fake.issue(groups=["g"]))


async def test_unreachable_globus_is_503(build: Build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(ServiceUnavailable) as raised:
        await build().authenticate("AgSomeToken")
    assert "cannot be reached" in raised.value.message


async def test_slow_globus_is_503_within_the_timeout(fake: FakeGlobus, build: Build) -> None:
    auth = build(timeout=0.3)
    fake.delay = 1.0
    token = fake.issue()
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as raised:
        await auth.authenticate(token)
    assert time.monotonic() - started < 0.9 and "0.3 s" in raised.value.message
    fake.delay = 0
    await asyncio.sleep(0.5)  # the look-up that timed out ends; the next request asks again
    assert (await auth.authenticate(token)).username == "jdoe@anl.gov"


async def test_rejected_gateway_credentials_are_503_and_logged(
    fake: FakeGlobus, build: Build, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET", "wrong")
    token = fake.issue()
    with caplog.at_level(logging.DEBUG), pytest.raises(ServiceUnavailable):
        await build().authenticate(token)
    assert any("refused the gateway itself" in record.getMessage() for record in caplog.records)
    assert all(token not in record.getMessage() for record in caplog.records)


async def test_missing_groups_consent_is_403(fake: FakeGlobus, build: Build) -> None:
    with pytest.raises(PermissionDenied) as raised:
        await build(required_groups=["g"]).authenticate(fake.issue(groups=["g"], groups_consent=False))
    assert raised.value.code == "groups_consent_required"


async def test_replicas_share_verdicts_through_redis(fake: FakeGlobus, build: Build) -> None:
    cache = {
        "seconds": 30,
        "redis_url": "redis://127.0.0.1:6379/0",
        "redis_prefix": f"test-auth-{os.urandom(6).hex()}:",
    }
    first, second = build(cache=cache), build(cache=cache)
    token = fake.issue()
    assert (await first.authenticate(token)) == (await second.authenticate(token))
    assert fake.calls["introspect"] == 1
    # Other rules mean another verdict: a replica with them does not reuse this one.
    await build(cache=cache, allowed_domains=["anl.gov"]).authenticate(token)
    assert fake.calls["introspect"] == 2


def test_credentials_come_from_the_environment_or_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INFERENCE_GATEWAY_GLOBUS_CLIENT_ID", raising=False)
    monkeypatch.delenv("INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="INFERENCE_GATEWAY_GLOBUS_CLIENT_ID"):
        ClientCredentials.load(GlobusAuthSettings())
    secrets = tmp_path / "globus.yaml"
    secrets.write_text(f"client_id: {GATEWAY_CLIENT_ID}\nclient_secret: {GATEWAY_CLIENT_SECRET}\n")
    secrets.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ClientCredentials.load(GlobusAuthSettings(secrets_file=str(secrets)))
    secrets.chmod(0o600)
    credentials = ClientCredentials.load(GlobusAuthSettings(secrets_file=str(secrets)))
    assert credentials == ClientCredentials(GATEWAY_CLIENT_ID, GATEWAY_CLIENT_SECRET)
    assert GATEWAY_CLIENT_SECRET not in repr(credentials)
    monkeypatch.setenv("INFERENCE_GATEWAY_GLOBUS_CLIENT_ID", "from-env")
    monkeypatch.setenv("INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET", "env-secret")
    assert ClientCredentials.load(GlobusAuthSettings(secrets_file=str(secrets))).client_id == "from-env"
