"""Which APIs an endpoint serves: from its kind by default, from its ``apis`` key, and the paths they take."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from compute_functions.routes import url_of
from gateway.config import GatewayConfig
from gateway.federation.registry import Endpoint


def endpoint(**settings: object) -> Endpoint:
    config = GatewayConfig.model_validate(
        {"endpoints": [{"cluster": "c", "framework": "f", "models": ["m"], "base_url": "http://h/v1", **settings}]}
    )
    return Endpoint.from_settings(config.endpoints[0], "http://h/v1")


def test_a_vllm_endpoint_serves_every_api_until_its_server_says_otherwise() -> None:
    served = endpoint()
    assert served.offers("messages") and served.offers("rerank")
    served.unserved.add("rerank")
    assert not served.offers("rerank") and "rerank" not in served.served_apis


def test_an_openai_endpoint_has_no_anthropic_or_vllm_routes() -> None:
    openai = endpoint(kind="openai", api_key_env="KEY")
    assert openai.served_apis == ["chat/completions", "completions", "embeddings", "responses"]


def test_the_apis_key_names_known_apis_only() -> None:
    assert endpoint(apis=["tokenize"]).served_apis == ["tokenize"]
    with pytest.raises(ValidationError, match="unknown API chat; the APIs are chat/completions"):
        endpoint(apis=["chat"])


@pytest.mark.parametrize(
    ("base_url", "op", "url"),
    [
        ("http://h:1/v1", "responses", "http://h:1/v1/responses"),
        ("http://h:1/v1", "messages/count_tokens", "http://h:1/v1/messages/count_tokens"),
        ("http://h:1/v1", "tokenize", "http://h:1/tokenize"),
        ("https://h/proxy/v1", "rerank", "https://h/proxy/rerank"),
    ],
)
def test_vllm_serves_scoring_and_the_tokenizer_from_its_root(base_url: str, op: str, url: str) -> None:
    assert url_of(base_url, op) == url
