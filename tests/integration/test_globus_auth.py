"""Globus access tokens through a real gateway process, with the real globus-sdk against the local Globus stand-in."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from compute_functions.model_server import ModelServer
from tests.globus_fake import FakeGlobus
from tests.support import TOKEN, api_url, endpoint, gateway, simulator

MODEL = "facebook/opt-125m"
QUESTION = [{"role": "user", "content": "Explain the concept of Globus Compute in simple terms."}]
ROBOT = "5e0b8f0a-0000-4000-8000-000000000b07"
ISSUED: list[str] = []


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGlobus]:
    with FakeGlobus() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeGlobus) -> None:
    fake.calls.clear()
    fake.fail.clear()
    fake.delay = 0.0


@pytest.fixture(scope="module")
def backend() -> Iterator[ModelServer]:
    with simulator("--tpot", "0.001", models=(MODEL, "team-model", "anl-model")) as server:
        yield server


def config(backend: ModelServer, **globus: Any) -> dict[str, Any]:
    """Three endpoints: open to every admitted user, to group g-team, and (by cluster rule) to anl.gov."""
    return {
        "auth": {
            "providers": ["dev", "globus"],
            "globus": {"timeout": 1.0, **globus},
            "clusters": {"secure": {"allowed_domains": ["anl.gov"]}},
        },
        "endpoints": [
            endpoint(backend.base_url, [MODEL]),
            endpoint(backend.base_url, ["team-model"], cluster="team", allowed_groups=["g-team"]),
            endpoint(backend.base_url, ["anl-model"], cluster="secure"),
        ],
    }


@pytest.fixture(scope="module")
def front(fake: FakeGlobus, backend: ModelServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    rules = {
        "allowed_domains": ["anl.gov", "uchicago.edu"],
        "required_groups": ["g-users", "g-team"],
        "service_accounts": [ROBOT],
    }
    with gateway(
        config(backend, **rules), tmp_path_factory.mktemp("globus"), env=fake.gateway_env(), log_level="debug"
    ) as server:
        yield server


def issue(fake: FakeGlobus, username: str = "jdoe@anl.gov", **grant: Any) -> str:
    token = fake.issue(username, **grant)
    ISSUED.append(token)
    return token


def get(server: ModelServer, path: str, token: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{server.port}/resource_server{path}",
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )


def refused(response: httpx.Response, status: int, code: str, token: str) -> str:
    """The error message of an OpenAI-shaped refusal, which must not repeat the token."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and token not in response.text
    return str(error["message"])


def test_valid_token_chats_like_the_usage_guide(fake: FakeGlobus, front: ModelServer) -> None:
    client = openai.OpenAI(base_url=api_url(front), api_key=issue(fake, groups=["g-users"]), max_retries=0)
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5)  # type: ignore[arg-type]
    assert response.usage is not None and response.usage.completion_tokens == 5


def test_whoami_returns_identity_and_groups(fake: FakeGlobus, front: ModelServer) -> None:
    me = get(front, "/whoami", issue(fake, "jdoe@anl.gov", name="Jane Doe", groups=["g-users", "g-x"])).json()
    assert me["username"] == "jdoe@anl.gov" and me["name"] == "Jane Doe" and me["idp_domain"] == "anl.gov"
    assert me["groups"] == ["g-users", "g-x"] and me["provider"] == "globus" and len(me["identity_set"]) == 1
    assert get(front, "/whoami", TOKEN).json()["provider"] == "dev"


def test_what_the_caller_may_not_use_is_hidden_and_refused(fake: FakeGlobus, front: ModelServer) -> None:
    outsider = issue(fake, "ann@uchicago.edu", groups=["g-users"])
    insider = issue(fake, "jdoe@anl.gov", groups=["g-team"])
    assert [m["id"] for m in get(front, "/v1/models", outsider).json()["data"]] == [MODEL]
    assert [e["id"] for e in get(front, "/list-endpoints", outsider).json()["data"]] == ["local/vllm"]
    assert {m["id"] for m in get(front, "/v1/models", insider).json()["data"]} == {MODEL, "team-model", "anl-model"}
    for cluster, model in (("team", "team-model"), ("secure", "anl-model")):
        for path in ("/resource_server/v1/chat/completions", f"/resource_server/{cluster}/vllm/v1/chat/completions"):
            response = httpx.post(
                f"http://127.0.0.1:{front.port}{path}",
                headers={"authorization": f"Bearer {outsider}"},
                json={"model": model, "messages": QUESTION, "max_tokens": 2},
            )
            refused(response, 403, "model_not_permitted", outsider)


def test_expired_and_inactive_tokens_are_401(fake: FakeGlobus, front: ModelServer) -> None:
    expired = issue(fake, groups=["g-users"], lifetime=-5)
    assert "expired" in refused(get(front, "/v1/models", expired), 401, "invalid_token", expired)
    refused(get(front, "/v1/models", "AgNoSuchToken"), 401, "invalid_token", "AgNoSuchToken")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api_url(front), api_key=expired, max_retries=0).models.list()


def test_token_for_another_scope_is_403(fake: FakeGlobus, front: ModelServer) -> None:
    token = issue(fake, groups=["g-users"], scope="urn:globus:auth:scope:transfer.api.globus.org:all")
    assert "scope" in refused(get(front, "/v1/models", token), 403, "insufficient_scope", token)


def test_refused_identity_provider_is_403(fake: FakeGlobus, front: ModelServer) -> None:
    token = issue(fake, "jane@gmail.com", groups=["g-users"])
    message = refused(get(front, "/v1/models", token), 403, "identity_provider_not_allowed", token)
    assert "anl.gov" in message and "jane@gmail.com" in message
    both = ("jane@gmail.com", "jdoe@anl.gov")
    linked = issue(fake, "jane@gmail.com", linked=both[1:], session=both, groups=["g-users"])
    assert get(front, "/whoami", linked).json()["username"] == "jdoe@anl.gov"


def test_caller_outside_the_required_groups_is_403_without_naming_them(fake: FakeGlobus, front: ModelServer) -> None:
    token = issue(fake, groups=["g-elsewhere"])
    message = refused(get(front, "/v1/models", token), 403, "group_required", token)
    assert "g-users" not in message and "g-team" not in message and "g-elsewhere" not in message


def test_service_accounts_only_when_listed(fake: FakeGlobus, front: ModelServer) -> None:
    robot = fake.service_account_token(ROBOT)
    ISSUED.append(robot)
    me = get(front, "/whoami", robot).json()
    assert me["username"] == f"{ROBOT}@clients.auth.globus.org" and me["client_id"] == ROBOT
    stranger = fake.service_account_token("0d1e2f3a-0000-4000-8000-000000000bad")
    ISSUED.append(stranger)
    refused(get(front, "/v1/models", stranger), 403, "service_account_not_allowed", stranger)


@pytest.mark.parametrize("status", [500, 503])
def test_globus_outage_is_503_not_401(fake: FakeGlobus, front: ModelServer, status: int) -> None:
    token = issue(fake, groups=["g-users"])
    fake.fail["introspect"] = status
    response = get(front, "/v1/models", token)
    refused(response, 503, "auth_unavailable", token)
    assert response.headers["retry-after"]
    fake.fail.clear()
    assert get(front, "/v1/models", token).status_code == 200


def test_slow_globus_is_503_within_the_configured_wait(fake: FakeGlobus, front: ModelServer) -> None:
    token = issue(fake, groups=["g-users"])
    fake.delay = 3.0
    started = time.monotonic()
    response = get(front, "/v1/models", token)
    assert time.monotonic() - started < 2.0
    assert "did not answer within 1 s" in refused(response, 503, "auth_unavailable", token)


def test_200_concurrent_requests_with_a_new_token_cause_one_introspection(fake: FakeGlobus, front: ModelServer) -> None:
    token = issue(fake, groups=["g-users"])
    # Each of the three calls (introspection, dependent token, groups) takes this long, so the requests arrive while
    # they are under way; together well inside the gateway's 1 s budget for Globus, even on a busy machine.
    fake.delay = 0.15

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            url = f"http://127.0.0.1:{front.port}/resource_server/v1/models"
            headers = {"authorization": f"Bearer {token}"}
            responses = await asyncio.gather(*(client.get(url, headers=headers) for _ in range(200)))
        return [response.status_code for response in responses]

    assert asyncio.run(burst()) == [200] * 200
    assert fake.calls["introspect"] == 1 and fake.calls["dependent_token"] == 1 and fake.calls["my_groups"] == 1


def test_revoked_token_stops_working_when_its_cache_entry_ends(
    fake: FakeGlobus, backend: ModelServer, tmp_path: Path
) -> None:
    with gateway(config(backend, cache={"seconds": 1}), tmp_path, env=fake.gateway_env()) as server:
        token = issue(fake)
        assert get(server, "/v1/models", token).status_code == 200
        fake.revoke(token)
        assert get(server, "/v1/models", token).status_code == 200
        time.sleep(1.1)
        refused(get(server, "/v1/models", token), 401, "invalid_token", token)
    assert fake.calls["introspect"] == 2


def test_replicas_share_the_cache_through_redis(fake: FakeGlobus, backend: ModelServer, tmp_path: Path) -> None:
    prefix = f"test-gateway-{os.urandom(6).hex()}:"
    cache = {"seconds": 30, "redis_url": "redis://127.0.0.1:6379/0", "redis_prefix": prefix}
    shared = config(backend, cache=cache)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        gateway(shared, tmp_path / "a", env=fake.gateway_env()) as first,
        gateway(shared, tmp_path / "b", env=fake.gateway_env()) as second,
    ):
        token = issue(fake)
        assert get(first, "/whoami", token).json() == get(second, "/whoami", token).json()
    assert fake.calls["introspect"] == 1


def test_tokens_never_appear_in_the_gateway_log(fake: FakeGlobus, front: ModelServer) -> None:
    """Runs last, so the log holds every request of this module; the gateway logs at debug level."""
    ISSUED.append("AgMadeUpToken0123456789")
    for token in (issue(fake, groups=["g-users"]), issue(fake, "x@gmail.com"), ISSUED[-1]):
        get(front, "/v1/models", token)
    log = front.log_path.read_text()
    assert "globus_sdk" in log and "/v2/oauth2/token/introspect" in log
    assert not [token for token in ISSUED if token in log]
