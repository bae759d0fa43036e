"""The endpoint registry: every backend the gateway knows, and who may use it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.auth.base import Identity
from gateway.config import EndpointSettings
from gateway.errors import NotFound, PermissionDenied

# An endpoint that refused a connection is passed over for this long, so that
# the next requests go straight to a working one instead of paying the failure.
DOWN_SECONDS = 5.0


@dataclass(eq=False)
class Endpoint:
    """One backend: a cluster and framework serving some models through one transport."""

    cluster: str
    framework: str
    models: tuple[str, ...]
    transport: str
    kind: str
    base_url: str
    api_key_env: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    allowed_groups: frozenset[str] = frozenset()
    allowed_domains: frozenset[str] = frozenset()
    max_connections: int = 1000
    down_until: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.cluster}/{self.framework}"

    @property
    def route(self) -> str:
        return f"/resource_server/{self.cluster}/{self.framework}/v1"

    def backend_model(self, model: str) -> str:
        """The name the backend knows ``model`` by."""
        return self.aliases.get(model, model)

    def allows(self, identity: Identity) -> bool:
        if self.allowed_groups and not (self.allowed_groups & identity.groups):
            return False
        if self.allowed_domains and identity.idp_domain not in self.allowed_domains:
            return False
        return True

    def is_up(self, now: float) -> bool:
        return now >= self.down_until

    def mark_down(self) -> None:
        self.down_until = time.monotonic() + DOWN_SECONDS

    def mark_up(self) -> None:
        self.down_until = 0.0

    @classmethod
    def from_settings(cls, settings: EndpointSettings, base_url: str) -> Endpoint:
        aliases = dict(settings.aliases)
        if settings.kind == "openai":
            for model in settings.models:
                aliases.setdefault(model, model.removeprefix("openai/"))
        return cls(
            cluster=settings.cluster,
            framework=settings.framework,
            models=tuple(settings.models),
            transport=settings.transport,
            kind=settings.kind,
            base_url=base_url,
            api_key_env=settings.api_key_env,
            aliases=aliases,
            allowed_groups=frozenset(settings.allowed_groups),
            allowed_domains=frozenset(settings.allowed_domains),
            max_connections=settings.max_connections,
        )


class Registry:
    """Looks up endpoints by model, or by cluster and framework for the cluster-specific routes."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = list(endpoints)
        self._by_model: dict[str, list[Endpoint]] = {}
        self._by_route: dict[tuple[str, str], list[Endpoint]] = {}
        for endpoint in self.endpoints:
            for model in endpoint.models:
                self._by_model.setdefault(model, []).append(endpoint)
            self._by_route.setdefault((endpoint.cluster, endpoint.framework), []).append(endpoint)
        self._clusters = {endpoint.cluster for endpoint in self.endpoints}

    def candidates(
        self, model: str, identity: Identity, cluster: str | None = None, framework: str | None = None
    ) -> list[Endpoint]:
        """Endpoints that may serve ``model`` for ``identity``, the ones not known to be down first.

        Raises ``NotFound`` for an unknown cluster, framework or model and
        ``PermissionDenied`` when the model exists but the caller may use none of its endpoints.
        """
        if cluster is None or framework is None:
            serving = self._by_model.get(model, [])
        else:
            if cluster not in self._clusters:
                raise NotFound(f"Cluster '{cluster}' is not served by this gateway.", code="cluster_not_found")
            on_route = self._by_route.get((cluster, framework))
            if on_route is None:
                raise NotFound(
                    f"Framework '{framework}' is not available on cluster '{cluster}'.", code="framework_not_found"
                )
            serving = [endpoint for endpoint in on_route if model in endpoint.models]
        if not serving:
            where = f" on {cluster}/{framework}" if cluster else ""
            raise NotFound(f"Model '{model}' is not available{where}.", code="model_not_found", param="model")
        allowed = [endpoint for endpoint in serving if endpoint.allows(identity)]
        if not allowed:
            raise PermissionDenied(
                f"You are not allowed to use model '{model}'.", code="model_not_permitted", param="model"
            )
        if len(allowed) > 1:
            now = time.monotonic()
            allowed.sort(key=lambda endpoint: not endpoint.is_up(now))
        return allowed

    def visible_to(self, identity: Identity) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.allows(identity)]
