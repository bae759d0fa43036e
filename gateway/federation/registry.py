"""The endpoint registry: every backend the gateway knows, and who may use it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.base import Identity
from gateway.config import SERVED_APIS, AccessSettings, EndpointSettings, GlobusComputeSettings
from gateway.errors import NotFound, PermissionDenied
from gateway.federation.availability import Availability, State

# Consecutive failures that open an endpoint's circuit breaker, and for how long it stays open
# unless the availability tracker sees the endpoint serving again first.
BREAKER_FAILURES = 3
BREAKER_SECONDS = 30.0
# Weight of the newest request in the moving average of time per token.
LATENCY_WEIGHT = 0.2
# How fast that average fades while an endpoint gets no request: an endpoint passed over because it looked slow
# looks as fast as any other after a few half-lives, gets a request, and is measured anew. Without it, one slow
# answer would keep an endpoint out for good, since only a request it serves can change the figure.
LATENCY_HALF_LIFE = 2.0
# An observation older than this no longer says anything: the endpoint's state becomes ``unknown``.
STALE_SECONDS = 60.0


class InFlight:
    """One request counted among its endpoint's ``in_flight`` from entering a ``with`` block to leaving it."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def __enter__(self) -> None:
        self.endpoint.in_flight += 1

    def __exit__(self, *exc_info: object) -> None:
        self.endpoint.in_flight -= 1


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
    cluster_groups: frozenset[str] = frozenset()
    cluster_domains: frozenset[str] = frozenset()
    max_connections: int = 1000
    globus: GlobusComputeSettings | None = None
    # The ``model_server`` argument of the compute functions (transports parsl and globus).
    worker_model_server: dict[str, Any] | None = None
    # Its configured model server is the simulator: known before the first status, whatever the transport.
    simulator: bool = False
    # The APIs its model server answers, as configured (or its kind's); ``unserved`` those it answered 404 for.
    apis: tuple[str, ...] = SERVED_APIS["vllm"]
    unserved: set[str] = field(default_factory=set)
    availability: Availability = field(default_factory=lambda: Availability("unknown", observed_at=0.0))
    maintenance: str | None = None
    in_flight: int = 0
    others_load: int = 0
    # Seconds per token (each generated token, plus one for the prompt) of recent answers, and when last measured:
    # per token, so that a request that asked for 2,000 tokens does not make its endpoint look slow.
    latency: float = 0.0
    latency_at: float = 0.0
    failures: int = 0
    down_until: float = 0.0
    stale_after: float = STALE_SECONDS
    breaker_failures: int = BREAKER_FAILURES
    breaker_seconds: float = BREAKER_SECONDS

    @property
    def id(self) -> str:
        return f"{self.cluster}/{self.framework}"

    @property
    def route(self) -> str:
        return f"/resource_server/{self.cluster}/{self.framework}/v1"

    @property
    def simulated(self) -> bool:
        """Whether its answers are synthetic: the simulator is configured here, or the backend says it is one."""
        return self.simulator or self.availability.simulated

    def offers(self, api: str) -> bool:
        """Whether its model server answers ``api`` (``responses``, ``messages``, ...), as far as is known."""
        return api in self.apis and api not in self.unserved

    @property
    def served_apis(self) -> list[str]:
        return [api for api in self.apis if api not in self.unserved]

    def backend_model(self, model: str) -> str:
        """The name the backend knows ``model`` by."""
        return self.aliases.get(model, model)

    def allows(self, identity: Identity) -> bool:
        """Whether ``identity`` passes both this endpoint's own rules and its cluster's."""
        return _admits(self.allowed_groups, self.allowed_domains, identity) and _admits(
            self.cluster_groups, self.cluster_domains, identity
        )

    def state(self, wall_now: float, model: str | None = None) -> State:
        """The state to route by (for ``model`` when given): maintenance first, then the last observation
        while it is fresh."""
        if self.maintenance is not None:
            return "maintenance"
        if wall_now - self.availability.observed_at > self.stale_after:
            return "unknown"
        if model is not None and model in self.availability.cold_models and self.availability.state == "hot":
            return "cold"
        return self.availability.state

    def is_up(self, now: float) -> bool:
        """Whether the circuit breaker lets requests through (``now`` from ``time.monotonic``)."""
        return now >= self.down_until

    def observe(self, availability: Availability) -> None:
        """A new observation from the tracker; seeing the endpoint serve again closes its breaker."""
        self.availability = availability
        # What the backend reports includes this gateway's own requests; keep only the others'.
        reported = (availability.running or 0) + (availability.waiting or 0)
        self.others_load = max(reported - self.in_flight, 0)
        if availability.state == "hot" and self.down_until:
            self.down_until = 0.0
            self.failures = 0

    def serving(self) -> InFlight:
        """A ``with`` block during which one more request counts among ``in_flight``, however the block ends."""
        return InFlight(self)

    def record_failure(self, *, unreachable: bool = False) -> None:
        """A request failed here. Unreachable means nothing answered: the endpoint counts as offline
        until the tracker sees it again; other failures open the breaker once they repeat."""
        self.failures += 1
        if unreachable:
            self.availability = Availability("offline", detail="connection failed")
        if unreachable or self.failures >= self.breaker_failures:
            self.down_until = time.monotonic() + self.breaker_seconds

    def record_success(self, seconds: float | None = None, tokens: int | None = None) -> None:
        """A request succeeded here, taking ``seconds`` for ``tokens`` generated tokens when known (kept as a moving
        average of time per token)."""
        self.failures = 0
        if seconds is not None:
            per_token = seconds / (1 + (tokens or 0))
            self.latency = per_token if not self.latency else self.latency + LATENCY_WEIGHT * (per_token - self.latency)
            self.latency_at = time.monotonic()

    def recent_latency(self, now: float) -> float:
        """``latency``, faded by the time since it was last measured (``now`` is ``time.monotonic()``)."""
        fade: float = 0.5 ** ((now - self.latency_at) / LATENCY_HALF_LIFE)
        return self.latency * fade

    @classmethod
    def from_settings(
        cls, settings: EndpointSettings, base_url: str, cluster_access: AccessSettings | None = None
    ) -> Endpoint:
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
            apis=tuple(settings.apis) if settings.apis is not None else SERVED_APIS[settings.kind],
            api_key_env=settings.api_key_env,
            aliases=aliases,
            allowed_groups=frozenset(settings.allowed_groups),
            allowed_domains=frozenset(settings.allowed_domains),
            cluster_groups=frozenset(cluster_access.allowed_groups if cluster_access else ()),
            cluster_domains=frozenset(cluster_access.allowed_domains if cluster_access else ()),
            max_connections=settings.max_connections,
            globus=settings.globus,
            worker_model_server=settings.worker_model_server.model_dump() if settings.worker_model_server else None,
            simulator=settings.worker_model_server is not None and runs_simulator(settings.worker_model_server.command),
        )


def runs_simulator(command: Sequence[str]) -> bool:
    """Whether a model server's command line starts the simulator rather than a model."""
    return "gateway.simulator" in command or any(word.rsplit("/", 1)[-1] == "inference-simulator" for word in command)


def _admits(groups: frozenset[str], domains: frozenset[str], identity: Identity) -> bool:
    """Empty rules admit everyone; otherwise a shared group and an allowed domain are both needed."""
    return (not groups or not groups.isdisjoint(identity.groups)) and (not domains or identity.idp_domain in domains)


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
        """Endpoints that may serve ``model`` for ``identity``; ``selection.plan`` orders them.

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
        return allowed

    def serves(self, model: str) -> bool:
        """Whether any endpoint lists ``model``, whoever may use it."""
        return model in self._by_model

    def visible_to(self, identity: Identity) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.allows(identity)]

    def clusters(self) -> list[str]:
        return sorted(self._clusters)

    def on_cluster(self, cluster: str) -> list[Endpoint]:
        """The endpoints of ``cluster``; ``NotFound`` when no endpoint is on it."""
        if cluster not in self._clusters:
            raise NotFound(f"Cluster '{cluster}' is not served by this gateway.", code="cluster_not_found")
        return [endpoint for endpoint in self.endpoints if endpoint.cluster == cluster]
