"""Everything a running gateway holds: registry, dispatchers, authenticators and its model servers."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from compute_functions.model_server import ModelServer
from gateway.auth.base import Authenticator
from gateway.auth.bearer import ProviderChain
from gateway.auth.dev import DevAuthenticator, dev_token
from gateway.config import GatewayConfig
from gateway.dispatch.base import Dispatcher
from gateway.dispatch.direct import DirectDispatcher
from gateway.federation.registry import Endpoint, Registry

log = logging.getLogger("gateway")


class Runtime:
    """The gateway's live parts, built from a ``GatewayConfig`` and started and stopped with the app."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.state_dir: Path = config.state_dir()
        self.model_servers = {
            settings.name: ModelServer(
                settings.command,
                host=settings.host,
                port=settings.port,
                health_path=settings.health_path,
                env=settings.env,
                log_path=self.state_dir / "logs" / f"{settings.name}.log",
            )
            for settings in config.model_servers
        }
        endpoints = []
        for settings in config.endpoints:
            if settings.model_server is not None:
                base_url = self.model_servers[settings.model_server].base_url
            else:
                assert settings.base_url is not None
                base_url = settings.base_url
            endpoints.append(Endpoint.from_settings(settings, base_url))
        self.registry = Registry(endpoints)
        self.dispatchers: dict[str, Dispatcher] = {
            "direct": DirectDispatcher(
                connect_timeout=config.server.connect_timeout, read_timeout=config.server.request_timeout
            ),
        }
        self.authenticator: Authenticator = ProviderChain([])

    def _build_authenticator(self) -> Authenticator:
        providers: list[Authenticator] = []
        if "dev" in self.config.auth.providers:
            settings = self.config.auth.dev
            token = dev_token(self.state_dir, settings.token_env, create=True)
            assert token is not None
            providers.append(DevAuthenticator(token, settings.username))
        return ProviderChain(providers)

    async def start(self) -> None:
        self.authenticator = self._build_authenticator()
        await self.authenticator.start()
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        for name, server in self.model_servers.items():
            settings = next(s for s in self.config.model_servers if s.name == name)
            log.info("starting model server %s: %s", name, " ".join(server.command))
            await asyncio.to_thread(server.start, settings.startup_timeout)
            log.info("model server %s is up at %s", name, server.base_url)
        for dispatcher in self.dispatchers.values():
            await dispatcher.start()
        if "dev" in self.config.auth.providers:
            print(
                "Dev auth is on. Export the token with:\n  export MY_TOKEN=$(inference-gateway dev-token)",
                file=sys.stderr,
                flush=True,
            )

    async def close(self) -> None:
        for dispatcher in self.dispatchers.values():
            await dispatcher.close()
        for server in self.model_servers.values():
            await asyncio.to_thread(server.stop)
        await self.authenticator.close()

    def dispatcher(self, endpoint: Endpoint) -> Dispatcher:
        return self.dispatchers[endpoint.transport]
