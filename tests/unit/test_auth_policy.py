"""Who the access policy lets in, read from introspection answers shaped like Globus Auth's."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.auth.base import Identity
from gateway.auth.policy import AccessPolicy
from gateway.config import AccessSettings, EndpointSettings
from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.federation.registry import Endpoint

SCOPE = "https://auth.globus.org/scopes/gateway/action_all"
NOW = time.time()
ANL = {"sub": "id-anl", "username": "jdoe@anl.gov", "name": "Jane Doe", "identity_provider": "idp-anl"}
GMAIL = {"sub": "id-gmail", "username": "jane@gmail.com", "name": "Jane", "identity_provider": "idp-google"}


def introspection(*, session: tuple[dict[str, Any], ...] = (ANL,), **fields: Any) -> dict[str, Any]:
    """An active token of a user whose identity set is ANL (primary) and GMAIL, logged in with ``session``."""
    info: dict[str, Any] = {
        "active": True,
        "scope": f"openid {SCOPE}",
        "client_id": "native-app",
        "sub": ANL["sub"],
        "username": ANL["username"],
        "name": ANL["name"],
        "exp": int(NOW) + 3600,
        "identity_set": [ANL["sub"], GMAIL["sub"]],
        "identity_set_detail": [ANL, GMAIL],
        "session_info": {
            "session_id": "s",
            "authentications": {i["sub"]: {"idp": i["identity_provider"]} for i in session},
        },
    }
    info.update(fields)
    return info


def refusal(policy: AccessPolicy, info: dict[str, Any]) -> AuthenticationFailed | PermissionDenied:
    with pytest.raises((AuthenticationFailed, PermissionDenied)) as raised:
        policy.admit(info, NOW)
    return raised.value  # type: ignore[return-value]


def test_valid_token_gives_the_identity() -> None:
    identity = AccessPolicy.build(SCOPE).admit(introspection(), NOW)
    assert identity == Identity(
        subject="id-anl",
        username="jdoe@anl.gov",
        name="Jane Doe",
        idp_domain="anl.gov",
        identity_set=("id-anl", "id-gmail"),
        client_id="native-app",
        provider="globus",
    )


@pytest.mark.parametrize(
    ("info", "code"),
    [
        ({"active": False}, "invalid_token"),
        (introspection(active=False), "invalid_token"),
        (introspection(exp=int(NOW) - 1), "token_expired"),
    ],
)
def test_inactive_or_expired_token_is_401(info: dict[str, Any], code: str) -> None:
    error = refusal(AccessPolicy.build(SCOPE), info)
    assert isinstance(error, AuthenticationFailed) and error.code == code


def test_token_for_another_scope_is_403() -> None:
    error = refusal(AccessPolicy.build(SCOPE), introspection(scope="openid urn:globus:auth:scope:transfer"))
    assert isinstance(error, PermissionDenied) and error.code == "insufficient_scope"
    assert refusal(AccessPolicy.build(SCOPE), introspection(scope=SCOPE + "x")).code == "insufficient_scope"


def test_session_policies_must_all_evaluate_true() -> None:
    policy = AccessPolicy.build(SCOPE, session_policies=["p1", "p2"])
    met = {"p1": {"evaluation": True}, "p2": {"evaluation": True}}
    assert policy.admit(introspection(policy_evaluations=met), NOW).username == "jdoe@anl.gov"
    error = refusal(policy, introspection(policy_evaluations={"p1": {"evaluation": True}, "p2": {"evaluation": False}}))
    assert error.code == "session_policy_not_met" and "(p2)" in error.message
    assert (
        refusal(policy, introspection(policy_evaluations={"p1": {"evaluation": True}})).code == "session_policy_not_met"
    )
    assert "(p1, p2)" in refusal(policy, introspection()).message


def test_allowed_domain_picks_the_session_identity_from_it() -> None:
    policy = AccessPolicy.build(SCOPE, allowed_domains=["ANL.gov"])
    identity = policy.admit(introspection(session=(GMAIL, ANL)), NOW)
    assert (identity.username, identity.idp_domain, identity.subject) == ("jdoe@anl.gov", "anl.gov", "id-anl")


def test_identity_linked_but_not_in_the_session_does_not_count() -> None:
    error = refusal(AccessPolicy.build(SCOPE, allowed_domains=["anl.gov"]), introspection(session=(GMAIL,)))
    assert isinstance(error, PermissionDenied) and error.code == "identity_provider_not_allowed"
    assert "anl.gov" in error.message and "jane@gmail.com" in error.message


def test_without_session_information_the_primary_identity_counts() -> None:
    policy = AccessPolicy.build(SCOPE, allowed_domains=["anl.gov"])
    assert policy.admit(introspection(session_info=None), NOW).idp_domain == "anl.gov"
    bare = {"active": True, "scope": SCOPE, "sub": "x", "username": "who@elsewhere.org", "exp": int(NOW) + 60}
    assert refusal(policy, bare).code == "identity_provider_not_allowed"


def test_without_domain_rules_the_first_session_identity_is_presented() -> None:
    assert AccessPolicy.build(SCOPE).admit(introspection(session=(GMAIL, ANL)), NOW).idp_domain == "gmail.com"


def service_account(client_id: str) -> dict[str, Any]:
    username = f"{client_id}@clients.auth.globus.org"
    detail = {"sub": client_id, "username": username, "name": "robot", "identity_provider": "client"}
    return introspection(
        sub=client_id,
        username=username,
        name="robot",
        client_id=client_id,
        identity_set=[client_id],
        identity_set_detail=[detail],
        session_info={"authentications": {}},
    )


def test_service_accounts_need_to_be_listed_and_skip_domain_and_group_rules() -> None:
    policy = AccessPolicy.build(
        SCOPE, allowed_domains=["anl.gov"], required_groups=["g-1"], service_accounts=["robot-1"]
    )
    identity = policy.admit(service_account("robot-1"), NOW)
    assert identity.username == "robot-1@clients.auth.globus.org" and identity.client_id == "robot-1"
    policy.require_groups(identity)
    error = refusal(policy, service_account("robot-2"))
    assert error.code == "service_account_not_allowed" and "robot-2" in error.message


def test_required_groups_any_of_without_naming_them() -> None:
    policy = AccessPolicy.build(SCOPE, required_groups=["secret-group-a", "secret-group-b"])
    identity = policy.admit(introspection(), NOW)
    policy.require_groups(Identity(**{**_fields(identity), "groups": frozenset({"other", "secret-group-b"})}))
    with pytest.raises(PermissionDenied) as raised:
        policy.require_groups(Identity(**{**_fields(identity), "groups": frozenset({"other"})}))
    assert raised.value.code == "group_required"
    assert "secret-group" not in raised.value.message


def _fields(identity: Identity) -> dict[str, Any]:
    return {name: getattr(identity, name) for name in Identity.__dataclass_fields__}


def test_endpoint_needs_its_own_rules_and_its_clusters() -> None:
    settings = EndpointSettings(
        cluster="sophia", framework="vllm", models=["m"], base_url="http://127.0.0.1:1/v1", allowed_groups=["g-end"]
    )
    endpoint = Endpoint.from_settings(settings, "http://127.0.0.1:1/v1", AccessSettings(allowed_domains=["ANL.GOV"]))
    anl = Identity(subject="s", username="jdoe@anl.gov", idp_domain="anl.gov", groups=frozenset({"g-end"}))
    assert endpoint.allows(anl)
    assert not endpoint.allows(Identity(subject="s", username="u", idp_domain="gmail.com", groups=frozenset({"g-end"})))
    assert not endpoint.allows(Identity(subject="s", username="u", idp_domain="anl.gov"))
    assert Endpoint.from_settings(settings, "http://127.0.0.1:1/v1").allows(
        Identity(subject="s", username="u", idp_domain="gmail.com", groups=frozenset({"g-end"}))
    )
