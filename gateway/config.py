"""The gateway's configuration: one YAML file, validated with pydantic.

A bad file is refused with a message that names the key and its line, so an
operator can fix it without reading this module.
"""

from __future__ import annotations

import os
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from compute_functions.routes import OPERATIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "endpoint_configs" / "local.yaml"


# Path segments after /resource_server/ that belong to the gateway's own routes.
RESERVED_CLUSTER_NAMES = frozenset(
    {"v1", "admin", "internal", "health", "ready", "status", "whoami", "list-endpoints", "metrics", "activity", "usage"}
    | {"login", "inference-auth-token.py"}
)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file, key and line."""


# The APIs a model server of each kind answers, by their path under /v1: vLLM's OpenAI-compatible server routes them
# all (a model whose task lacks one answers 404 there, which the gateway then learns); OpenAI's own API has no
# Anthropic messages, rerank, score or tokenizer.
SERVED_APIS: dict[str, tuple[str, ...]] = {
    "vllm": OPERATIONS,
    "openai": ("chat/completions", "completions", "embeddings", "responses"),
}


def _known_apis(apis: list[str] | None) -> list[str] | None:
    unknown = sorted(set(apis or ()) - set(OPERATIONS))
    if unknown:
        raise ValueError(f"unknown API {', '.join(unknown)}; the APIs are {', '.join(OPERATIONS)}")
    return apis


# Identity-provider domains compare case-insensitively, as DNS names do.
Domains = Annotated[list[str], AfterValidator(lambda domains: [domain.lower() for domain in domains])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    state_dir: str | None = None
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    request_timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    # On SIGTERM the gateway stops accepting connections at once and gives the requests and streams in flight this
    # long to finish before it cuts them.
    drain_timeout: float = Field(default=60.0, gt=0)
    # Deeper bodies are refused with 400: the JSON writer that carries a body on stops at 254 levels.
    max_json_depth: int = Field(default=64, ge=2, le=200)
    # A request's line and headers together; past it 431 (414 when the line is most of it), before it is whole.
    max_header_bytes: int = Field(default=64 * 1024, ge=4096)
    max_headers: int = Field(default=100, ge=16)


class DevAuthSettings(_Strict):
    token_env: str = "INFERENCE_GATEWAY_DEV_TOKEN"
    username: str = "dev-user"


class AuthCacheSettings(_Strict):
    """How long verdicts on tokens are kept, and whether replicas share them through Redis."""

    seconds: float = Field(default=600.0, gt=0)
    refusal_seconds: float = Field(default=30.0, ge=0)
    max_entries: int = Field(default=100_000, ge=1)
    redis_url: str | None = None
    redis_url_env: str = "INFERENCE_GATEWAY_REDIS_URL"
    redis_prefix: str = "inference-gateway:auth:"

    def resolved_redis_url(self) -> str | None:
        return os.environ.get(self.redis_url_env) or self.redis_url


class GlobusAuthSettings(_Strict):
    """Globus Auth token introspection and who it lets in.

    The gateway's client id and secret never live in this file: they come from
    the variables named here or from ``secrets_file``.
    """

    client_id_env: str = "INFERENCE_GATEWAY_GLOBUS_CLIENT_ID"
    client_secret_env: str = "INFERENCE_GATEWAY_GLOBUS_CLIENT_SECRET"
    secrets_file: str | None = None
    scope: str | None = None
    # The native app (public client) users log in with; the inference-auth-token the gateway serves names it.
    native_client_id: str | None = None
    session_policies: list[str] = Field(default_factory=list)
    allowed_domains: Domains = Field(default_factory=list)
    required_groups: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    fetch_groups: bool | None = None
    timeout: float = Field(default=5.0, gt=0)
    cache: AuthCacheSettings = Field(default_factory=AuthCacheSettings)

    @model_validator(mode="after")
    def _groups_readable(self) -> GlobusAuthSettings:
        if self.required_groups and self.fetch_groups is False:
            raise ValueError("required_groups needs the caller's groups: remove fetch_groups: false")
        return self


class AccessSettings(_Strict):
    """Who may use one cluster: members of any of ``allowed_groups``, from any of ``allowed_domains``."""

    allowed_groups: list[str] = Field(default_factory=list)
    allowed_domains: Domains = Field(default_factory=list)


class AuthSettings(_Strict):
    providers: list[Literal["dev", "globus"]] = Field(default_factory=lambda: ["dev"], min_length=1)  # type: ignore[arg-type]
    dev: DevAuthSettings = Field(default_factory=DevAuthSettings)
    globus: GlobusAuthSettings = Field(default_factory=GlobusAuthSettings)
    clusters: dict[str, AccessSettings] = Field(default_factory=dict)


class ModelServerSettings(_Strict):
    """A model server the gateway starts as a child process and stops with itself."""

    name: str
    command: list[str] = Field(min_length=1)
    port: int = Field(default=0, ge=0, le=65535)
    host: str = "127.0.0.1"
    health_path: str = "/health"
    startup_timeout: float = Field(default=120.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class WorkerModelServerSettings(_Strict):
    """How the workers of a ``parsl`` or ``globus`` endpoint start its model server on their node.

    ``command`` is a template: ``{python}`` (the worker's interpreter), ``{host}``, ``{port}`` and ``{model}`` (the
    model the request names) are filled in. Worker processes on one node share one server per filled-in command.
    """

    command: list[str] = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    health_path: str = "/health"
    startup_timeout: float = Field(default=600.0, gt=0)
    idle_timeout: float = Field(default=1800.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    state_dir: str | None = None


_PARSL_PROVIDER_KEYS = ("init_blocks", "min_blocks", "max_blocks", "worker_init", "launcher")


class ParslSettings(_Strict):
    """The Parsl executor of a ``parsl`` endpoint: where its workers come from and how many run per node."""

    provider: Literal["local", "slurm", "pbspro"] = "local"
    provider_options: dict[str, Any] = Field(default_factory=dict)
    launcher: Literal["single_node", "simple", "srun", "mpiexec", "aprun"] | None = None
    # The node's request server holds this many requests at once, each waiting on the model server, which does the
    # computing: so requests, not cores, are what to size. 256 is vLLM's default max-num-seqs. Parsl's name,
    # ``max_workers_per_node``, is still read with the meaning it had here: the requests a node serves at once.
    requests_per_node: int = Field(
        default=256, ge=1, validation_alias=AliasChoices("requests_per_node", "max_workers_per_node")
    )
    # Parsl worker processes per node: they only hand requests to the request server (each costs ~100 MB and a
    # second or so of CPU to start), and run the status and batch functions.
    workers_per_node: int = Field(default=2, ge=1)
    init_blocks: int = Field(default=1, ge=0)
    min_blocks: int = Field(default=0, ge=0)
    max_blocks: int = Field(default=1, ge=1)
    worker_init: str = ""
    heartbeat_period: int = Field(default=30, ge=1)
    heartbeat_threshold: int = Field(default=120, ge=2)
    # Seconds between Parsl's looks at the blocks (it submits the first ones on its first look); the gateway's one
    # Parsl kernel looks as often as the most eager of its endpoints asks.
    strategy_period: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _consistent(self) -> ParslSettings:
        if not self.min_blocks <= self.init_blocks <= self.max_blocks:
            raise ValueError("blocks must satisfy min_blocks <= init_blocks <= max_blocks")
        if self.heartbeat_threshold <= self.heartbeat_period:
            raise ValueError("heartbeat_threshold must be longer than heartbeat_period")
        reserved = sorted(set(self.provider_options) & set(_PARSL_PROVIDER_KEYS))
        if reserved:
            raise ValueError(f"set {', '.join(reserved)} as parsl keys, not in provider_options")
        if self.provider_options:
            # Here rather than at the top: it imports Parsl, a second that a gateway without such options never pays.
            from gateway.parsl_providers import provider_options

            accepted = provider_options(self.provider)
            unknown = sorted(set(self.provider_options) - accepted)
            if unknown:
                raise ValueError(
                    f"the {self.provider} provider takes no option {', '.join(unknown)} "
                    f"(it takes: {', '.join(sorted(accepted - set(_PARSL_PROVIDER_KEYS)))})"
                )
        return self

    @property
    def worker_processes(self) -> int:
        """The worker processes of a node: ``workers_per_node``, never more than there are requests to hold."""
        return min(self.workers_per_node, self.requests_per_node)


class RelaySettings(_Strict):
    """How workers send streamed answers back: the URL they post to, and Redis when replicas share the relay."""

    # Where workers reach this gateway; by default the address ``serve`` listens on.
    url: str | None = None
    redis_url: str | None = None
    redis_url_env: str = "INFERENCE_GATEWAY_RELAY_REDIS_URL"
    redis_prefix: str = "inference-gateway:relay:"
    # The key that signs stream tokens; replicas behind one relay need the same one (in Redis when unset).
    secret_env: str = "INFERENCE_GATEWAY_RELAY_SECRET"

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    def resolved_redis_url(self) -> str | None:
        return os.environ.get(self.redis_url_env) or self.redis_url


class ComputeFunctionIds(_Strict):
    """The ids Globus Compute gave the registered compute functions (``inference-gateway register-functions``)."""

    inference: UUID
    status: UUID | None = None
    batch: UUID | None = None


class GlobusComputeSettings(_Strict):
    """Where a ``globus`` endpoint's work runs: a Globus Compute endpoint and the registered compute functions."""

    endpoint_id: UUID
    function_ids: ComputeFunctionIds | None = None
    # How long the gateway waits for a task's result; by default the model server's startup_timeout,
    # plus server.request_timeout, plus a minute for the round trips through the Globus Compute service.
    task_timeout: float | None = Field(default=None, gt=0)
    amqp_port: Literal[443, 5671, 5672] | None = None
    # The SDK delays submissions beyond this many calls per window; its own default (4 per 16 s)
    # would make interactive requests wait seconds under load. 8 per 5 s keeps within the hosted
    # service's documented 20 calls per 10 s per client.
    api_burst_limit: int = Field(default=8, ge=1, le=8)
    api_burst_window: int = Field(default=5, ge=1, le=32)
    # With the relay, the workers hand requests to their node's request server, which holds this many at once
    # (as ``parsl.requests_per_node``; 256 is vLLM's default max-num-seqs).
    requests_per_node: int = Field(default=256, ge=1)


class EndpointSettings(_Strict):
    """One backend serving some models on one cluster with one framework."""

    cluster: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    framework: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    models: list[str] = Field(min_length=1)
    transport: Literal["direct", "parsl", "globus"] = "direct"
    kind: Literal["vllm", "openai"] = "vllm"
    # The APIs its model server answers (``chat/completions``, ``responses``, ``messages``, ``rerank``, ...);
    # by default those of its kind (``SERVED_APIS``).
    apis: Annotated[list[str] | None, AfterValidator(_known_apis)] = None
    base_url: str | None = None
    model_server: str | None = None
    api_key_env: str | None = None
    aliases: dict[str, str] = Field(default_factory=dict)
    allowed_groups: list[str] = Field(default_factory=list)
    allowed_domains: Domains = Field(default_factory=list)
    max_connections: int = Field(default=1000, ge=1)
    globus: GlobusComputeSettings | None = None
    worker_model_server: WorkerModelServerSettings | None = None
    parsl: ParslSettings | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_target(self) -> EndpointSettings:
        if self.transport == "direct":
            if (self.base_url is None) == (self.model_server is None):
                raise ValueError("give exactly one of base_url or model_server")
            if self.worker_model_server is not None:
                raise ValueError("worker_model_server is for endpoints of transport parsl or globus")
        else:
            if self.base_url is not None or self.model_server is not None:
                raise ValueError(
                    f"an endpoint of transport {self.transport} takes no base_url or model_server: "
                    "its workers start the model server from worker_model_server"
                )
            launch = self.worker_model_server
            if launch is None:
                raise ValueError(f"an endpoint of transport {self.transport} needs worker_model_server")
            if launch.port and len(self.models) > 1 and any("{model}" in part for part in launch.command):
                raise ValueError(
                    "worker_model_server starts one server per model ({model}), so it cannot use one fixed port"
                )
        if self.transport == "parsl" and self.parsl is None:
            self.parsl = ParslSettings()
        if self.transport != "parsl" and self.parsl is not None:
            raise ValueError("parsl is only for endpoints of transport parsl")
        if self.kind == "openai" and not self.api_key_env:
            raise ValueError("an endpoint of kind openai needs api_key_env (the variable holding the key)")
        return self

    @model_validator(mode="after")
    def _globus_target(self) -> EndpointSettings:
        if self.transport != "globus":
            if self.globus is not None:
                raise ValueError("globus is only for endpoints of transport globus")
            return self
        if self.globus is None:
            raise ValueError("an endpoint of transport globus needs a globus section with its endpoint_id")
        if self.globus.function_ids is None:
            raise ValueError(
                "globus.function_ids is missing: run `inference-gateway register-functions --config <this file>`"
            )
        return self


class DatabaseSettings(_Strict):
    """The database that keeps the usage log, and how usage rows travel to it off the request path."""

    url: str | None = None
    url_env: str = "INFERENCE_GATEWAY_DATABASE_URL"
    usage_log: bool = True
    queue_size: int = Field(default=100_000, ge=1)
    batch_size: int = Field(default=500, ge=1)
    flush_interval: float = Field(default=1.0, gt=0)
    retry_interval: float = Field(default=5.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    def resolved_url(self, state_dir: Path) -> str:
        """The configured URL, or a SQLite file in the state directory."""
        return os.environ.get(self.url_env) or self.url or f"sqlite+aiosqlite:///{state_dir / 'gateway.db'}"


class RateLimit(_Strict):
    """Limits on one scope (a user, a model, or a user on one model); an absent limit does not apply."""

    requests_per_second: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    concurrent_requests: int | None = Field(default=None, ge=1)


class ModelLimits(_Strict):
    """A model's limits for all its users together (``total``) and for each user of it (``per_user``)."""

    total: RateLimit = Field(default_factory=RateLimit)
    per_user: RateLimit = Field(default_factory=RateLimit)


class LimitSettings(_Strict):
    """Rate limits; counted in Redis when a URL is given (shared by replicas), in the process otherwise."""

    redis_url: str | None = None
    redis_url_env: str = "INFERENCE_GATEWAY_LIMITS_REDIS_URL"
    redis_prefix: str = "inference-gateway:limits:"
    # A concurrency slot in Redis is a lease its replica renews while the request runs: the slots of a replica
    # that died are free again this long after its last renewal.
    slot_lease_seconds: float = Field(default=10.0, ge=2)
    assumed_max_tokens: int = Field(default=256, ge=1)
    defaults: RateLimit = Field(default_factory=RateLimit)
    users: dict[str, RateLimit] = Field(default_factory=dict)
    models: dict[str, ModelLimits] = Field(default_factory=dict)

    def resolved_redis_url(self) -> str | None:
        return os.environ.get(self.redis_url_env) or self.redis_url


class ModelBounds(_Strict):
    """One model's own bounds; an absent one is taken from ``request_bounds``."""

    n: int | None = Field(default=None, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0)
    top_logprobs: int | None = Field(default=None, ge=0)
    dimensions: int | None = Field(default=None, ge=1)


class RequestBounds(_Strict):
    """The largest numbers a request may ask for; past them the gateway answers 400 and no backend sees it.

    The defaults are OpenAI's own limits (``n``, ``logprobs``, ``top_logprobs``) or generous ones (``max_tokens``,
    ``dimensions``); ``models`` narrows them for one model, e.g. ``max_tokens`` to its context length.
    """

    n: int = Field(default=128, ge=1)
    best_of: int = Field(default=128, ge=1)
    max_tokens: int = Field(default=131_072, ge=1)
    logprobs: int = Field(default=20, ge=0)
    top_logprobs: int = Field(default=20, ge=0)
    dimensions: int = Field(default=65_536, ge=1)
    models: dict[str, ModelBounds] = Field(default_factory=dict)

    def for_model(self, model: str) -> RequestBounds:
        own = self.models.get(model)
        if own is None:
            return self
        return self.model_copy(update=own.model_dump(exclude_none=True))


class LoggingSettings(_Strict):
    json_lines: bool = Field(default=True, alias="json")
    access_log: bool = True
    log_prompts: bool = False


class MetricsSettings(_Strict):
    """``/metrics`` answers callers from ``allow_networks``, and anyone bearing the token in ``token_env``."""

    enabled: bool = True
    allow_networks: list[IPvAnyNetwork] = Field(default_factory=lambda: [ip_network("127.0.0.0/8"), ip_network("::1")])
    token_env: str | None = None


class AdminSettings(_Strict):
    """Who may read everyone's usage: these usernames, and members of these groups."""

    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)


class FederationSettings(_Strict):
    """How the gateway learns each endpoint's state and chooses among endpoints serving the same model."""

    status_interval: float = Field(default=10.0, gt=0)
    status_jitter: float = Field(default=0.2, ge=0, lt=1)
    status_timeout: float = Field(default=5.0, gt=0)
    stale_after: float = Field(default=60.0, gt=0)
    failover_attempts: int = Field(default=3, ge=1)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_seconds: float = Field(default=30.0, gt=0)
    policy: Literal["least_loaded", "round_robin"] = "least_loaded"
    when_not_hot: Literal["reject", "hold"] = "reject"
    retry_after: int = Field(default=30, ge=1)
    maintenance: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fresh_enough(self) -> FederationSettings:
        if self.stale_after <= self.status_interval * (1 + self.status_jitter):
            raise ValueError("stale_after must be longer than the longest status interval")
        return self


class OfflineRunnerSettings(_Strict):
    """vLLM's offline batch runner, run on a worker for each ``chunk_lines`` lines of a batch instead of a server.

    ``command`` is a template: ``{python}`` (the worker's interpreter), ``{input}``, ``{output}`` and ``{model}``.
    """

    command: list[str] = Field(min_length=1)
    chunk_lines: int = Field(default=10_000, ge=1)
    env: dict[str, str] = Field(default_factory=dict)


class ClusterBatchSettings(_Strict):
    """What one cluster changes of the batch settings: its own roots, and how its workers answer batches."""

    allowed_roots: list[str] | None = None
    offline_runner: OfflineRunnerSettings | None = None


class BatchSettings(_Strict):
    """Batch jobs: the folders their files may be in, what each user may run, and how they are run.

    A root is a path, relative ones from the folder the gateway was started in; ``{username}`` in it becomes the
    caller's username, for a folder per user.
    """

    allowed_roots: list[str] = Field(default_factory=lambda: ["."])
    clusters: dict[str, ClusterBatchSettings] = Field(default_factory=dict)
    max_active_per_user: int = Field(default=10, ge=1)
    max_lines: int = Field(default=1_000_000, ge=1)
    max_line_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    # Requests one batch keeps in flight, and batches one gateway runs at once.
    concurrency: int = Field(default=64, ge=1, le=4096)
    max_running: int = Field(default=4, ge=1)
    # A worker works on a batch for this long per task, then the gateway sends the next task.
    slice_seconds: float = Field(default=60.0, gt=0)
    poll_interval: float = Field(default=2.0, gt=0)
    # A replica holds each batch it runs by a lease in the database, renewed four times a lease; the batches of a
    # replica that died are taken up by another this long after its last renewal.
    lease_seconds: float = Field(default=10.0, ge=1)
    completion_window: str = Field(default="24h", pattern=r"^[1-9][0-9]*h$")
    # Tasks in a row that fail without progress before the batch fails.
    max_attempts: int = Field(default=10, ge=1)


class GatewayConfig(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    model_servers: list[ModelServerSettings] = Field(default_factory=list)
    endpoints: list[EndpointSettings] = Field(min_length=1)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    request_bounds: RequestBounds = Field(default_factory=RequestBounds)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    batches: BatchSettings = Field(default_factory=BatchSettings)
    # The file this configuration came from, when not the embedded default: commands printed for users name it.
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        return self._source

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        for endpoint in self.endpoints:
            if endpoint.cluster in RESERVED_CLUSTER_NAMES:
                raise ValueError(f"'{endpoint.cluster}' cannot name a cluster: the gateway's own routes use it")
        names = [server.name for server in self.model_servers]
        if len(names) != len(set(names)):
            raise ValueError("model_servers names must be unique")
        for endpoint in self.endpoints:
            if endpoint.model_server is not None and endpoint.model_server not in names:
                raise ValueError(
                    f"endpoint {endpoint.cluster}/{endpoint.framework} names unknown model_server "
                    f"{endpoint.model_server!r}"
                )
        seen: set[tuple[str, str, str]] = set()
        for endpoint in self.endpoints:
            for model in endpoint.models:
                key = (endpoint.cluster, endpoint.framework, model)
                if key in seen:
                    raise ValueError(f"model {model!r} is listed twice for {endpoint.cluster}/{endpoint.framework}")
                seen.add(key)
        return self

    @model_validator(mode="after")
    def _cluster_rules(self) -> GatewayConfig:
        unknown = set(self.auth.clusters) - {endpoint.cluster for endpoint in self.endpoints}
        if unknown:
            raise ValueError(f"auth.clusters names clusters no endpoint serves: {', '.join(sorted(unknown))}")
        return self

    @model_validator(mode="after")
    def _limited_models(self) -> GatewayConfig:
        served = {model for endpoint in self.endpoints for model in endpoint.models}
        unknown = set(self.limits.models) - served
        if unknown:
            raise ValueError(f"limits.models names models no endpoint serves: {', '.join(sorted(unknown))}")
        unknown = set(self.request_bounds.models) - served
        if unknown:
            raise ValueError(f"request_bounds.models names models no endpoint serves: {', '.join(sorted(unknown))}")
        return self

    @model_validator(mode="after")
    def _batch_clusters(self) -> GatewayConfig:
        transports: dict[str, set[str]] = {}
        for endpoint in self.endpoints:
            transports.setdefault(endpoint.cluster, set()).add(endpoint.transport)
        unknown = set(self.batches.clusters) - set(transports)
        if unknown:
            raise ValueError(f"batches.clusters names clusters no endpoint serves: {', '.join(sorted(unknown))}")
        for cluster, settings in self.batches.clusters.items():
            if settings.offline_runner is not None and "direct" in transports[cluster]:
                raise ValueError(
                    f"batches.clusters.{cluster}.offline_runner needs workers: cluster {cluster} has a direct endpoint"
                )
        return self

    def state_dir(self) -> Path:
        configured = os.environ.get("INFERENCE_GATEWAY_STATE_DIR") or self.server.state_dir
        if configured:
            return Path(configured).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "inference-gateway"


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Read and validate a configuration file (the embedded default when ``path`` is None)."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    config = parse_config(text, str(source))
    if path is not None:
        config._source = source.absolute()
    return config


def parse_config(text: str, source: str = "<config>") -> GatewayConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with an 'endpoints' key")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = [part for part in error["loc"] if not (isinstance(part, str) and "[" in part)]
            key = ".".join(str(part) for part in location) or "(top level)"
            line = _line_of(root, location)
            where = f"line {line}: " if line else ""
            problems.append(f"{source}: {where}{key}: {error['msg']}")
        raise ConfigError("\n".join(problems)) from None


def _line_of(node: Any, location: list[Any]) -> int | None:
    """The 1-based line of the deepest YAML node on ``location`` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
