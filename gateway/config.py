"""The gateway's configuration: one YAML file, validated with pydantic.

A bad file is refused with a message that names the key and its line, so an
operator can fix it without reading this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "endpoint_configs" / "local.yaml"


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file, key and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    state_dir: str | None = None
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    request_timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)


class DevAuthSettings(_Strict):
    token_env: str = "INFERENCE_GATEWAY_DEV_TOKEN"
    username: str = "dev-user"


class AuthSettings(_Strict):
    providers: list[Literal["dev"]] = Field(default_factory=lambda: ["dev"], min_length=1)  # type: ignore[arg-type]
    dev: DevAuthSettings = Field(default_factory=DevAuthSettings)


class ModelServerSettings(_Strict):
    """A model server the gateway starts as a child process and stops with itself."""

    name: str
    command: list[str] = Field(min_length=1)
    port: int = Field(default=0, ge=0, le=65535)
    host: str = "127.0.0.1"
    health_path: str = "/health"
    startup_timeout: float = Field(default=120.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class EndpointSettings(_Strict):
    """One backend serving some models on one cluster with one framework."""

    cluster: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    framework: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    models: list[str] = Field(min_length=1)
    transport: Literal["direct"] = "direct"
    kind: Literal["vllm", "openai"] = "vllm"
    base_url: str | None = None
    model_server: str | None = None
    api_key_env: str | None = None
    aliases: dict[str, str] = Field(default_factory=dict)
    allowed_groups: list[str] = Field(default_factory=list)
    allowed_domains: list[str] = Field(default_factory=list)
    max_connections: int = Field(default=1000, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _one_target(self) -> EndpointSettings:
        if (self.base_url is None) == (self.model_server is None):
            raise ValueError("give exactly one of base_url or model_server")
        if self.kind == "openai" and not self.api_key_env:
            raise ValueError("an endpoint of kind openai needs api_key_env (the variable holding the key)")
        return self


class GatewayConfig(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    model_servers: list[ModelServerSettings] = Field(default_factory=list)
    endpoints: list[EndpointSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
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
    return parse_config(text, str(source))


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
