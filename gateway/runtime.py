"""Everything a running gateway holds: registry, dispatchers, authenticators and its model servers."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from pathlib import Path
from typing import Any

from compute_functions.model_server import ModelServer
from gateway.auth.base import Authenticator
from gateway.auth.bearer import ProviderChain
from gateway.auth.dev import DevAuthenticator, dev_token, token_command
from gateway.batches.service import Batches
from gateway.config import GatewayConfig
from gateway.dispatch.base import Dispatcher
from gateway.dispatch.direct import DirectDispatcher
from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint, Registry, runs_simulator
from gateway.federation.tracker import MAINTENANCE_FILE, AvailabilityTracker
from gateway.limits import build_limiter
from gateway.observability.ledger import RequestLedger
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.writer import UsageWriter
from gateway.storage.database import Database
from gateway.streaming.channels import NodeChannels
from gateway.streaming.relay import LocalRelay, build_relay

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
                # Workers of the parsl and globus transports find their model server on their node.
                base_url = settings.base_url or ""
            endpoint = Endpoint.from_settings(settings, base_url, config.auth.clusters.get(settings.cluster))
            if settings.model_server is not None:
                endpoint.simulator = runs_simulator(self.model_servers[settings.model_server].command)
            endpoints.append(endpoint)
        federation = config.federation
        for endpoint in endpoints:
            endpoint.stale_after = federation.stale_after
            endpoint.breaker_failures = federation.breaker_failures
            endpoint.breaker_seconds = federation.breaker_seconds
        self.registry = Registry(endpoints)
        self._warming: dict[str, asyncio.Task[Any]] = {}
        self.tracker = AvailabilityTracker(
            endpoints,
            self._status,
            interval=federation.status_interval,
            jitter=federation.status_jitter,
            timeout=federation.status_timeout,
            maintenance=federation.maintenance,
            maintenance_file=self.state_dir / MAINTENANCE_FILE,
        )
        self.dispatchers: dict[str, Dispatcher] = {
            "direct": DirectDispatcher(
                connect_timeout=config.server.connect_timeout, read_timeout=config.server.request_timeout
            ),
        }
        self.relay = build_relay(config.relay)
        parsl_endpoints = [settings for settings in config.endpoints if settings.transport == "parsl"]
        globus_endpoints = any(settings.transport == "globus" for settings in config.endpoints)
        # Node channels end in this process's memory: a node that dialled another replica could not be used here.
        self.channels = (
            NodeChannels(self.relay.tokens)
            if (parsl_endpoints or globus_endpoints) and isinstance(self.relay, LocalRelay)
            else None
        )
        if parsl_endpoints:
            # Importing Parsl takes most of a second: only gateways that use it pay for it.
            from gateway.dispatch.parsl import ParslDispatcher

            self.dispatchers["parsl"] = ParslDispatcher(
                parsl_endpoints,
                relay=self.relay,
                relay_url=config.relay.url,
                request_timeout=config.server.request_timeout,
                state_dir=self.state_dir,
                channels=self.channels,
            )
        if globus_endpoints:
            # The SDK is imported on first use, not here: importing it starts a thread.
            from gateway.dispatch.globus import GlobusDispatcher

            self.dispatchers["globus"] = GlobusDispatcher(
                relay=self.relay,
                relay_url=config.relay.url,
                request_timeout=config.server.request_timeout,
                channels=self.channels,
            )
        self.authenticator: Authenticator = ProviderChain([])
        self.limiter = build_limiter(config.limits)
        database = config.database
        self.database = Database(database.resolved_url(self.state_dir), timeout=database.timeout)
        self.usage = UsageWriter.for_config(config, self.state_dir)
        self.metrics: GatewayMetrics | None = None
        if config.metrics.enabled:
            assert self.usage is not None  # it counts the requests for the metrics
            self.metrics = GatewayMetrics(self.registry, self.usage, self.limiter, database.usage_log)
        self.batches = Batches(config, self.registry, self.dispatcher, self.database, self.state_dir)
        self.ledger = RequestLedger(self.usage) if self.usage is not None else None

    def _build_authenticator(self) -> Authenticator:
        """The configured providers, asked in the order the configuration lists them."""
        providers: list[Authenticator] = []
        for provider in self.config.auth.providers:
            if provider == "dev":
                settings = self.config.auth.dev
                token = dev_token(self.state_dir, settings.token_env, create=True)
                assert token is not None
                providers.append(DevAuthenticator(token, settings.username))
            elif provider == "globus":
                # Only gateways that use Globus auth pay for importing globus-sdk.
                from gateway.auth.globus import GlobusAuthenticator

                groups_needed = any(
                    endpoint.allowed_groups or endpoint.cluster_groups for endpoint in self.registry.endpoints
                )
                providers.append(
                    GlobusAuthenticator.from_settings(self.config.auth.globus, groups_needed=groups_needed)
                )
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
        await self.relay.start()
        for dispatcher in self.dispatchers.values():
            await dispatcher.start()
        await self.tracker.start()
        await self.limiter.start()
        if self.ledger is not None:
            await self.ledger.start()
        await self.batches.start()
        if "dev" in self.config.auth.providers:
            print(
                f"Dev auth is on. Export the token with:\n  export MY_TOKEN=$({token_command(self.config.source)})",
                file=sys.stderr,
                flush=True,
            )
        # What startup built lives as long as the process. Left to the collector, all of it is walked at every
        # full collection, which a busy gateway sets off several times a second: a quarter of its CPU, measured.
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        await self.batches.close()
        await self.tracker.close()
        for task in self._warming.values():
            task.cancel()
        for dispatcher in self.dispatchers.values():
            await dispatcher.close()
        await self.relay.close()
        for server in self.model_servers.values():
            await asyncio.to_thread(server.stop)
        await self.authenticator.close()
        if self.ledger is not None:
            await self.ledger.close()
        await self.database.close()
        await self.limiter.close()

    def dispatcher(self, endpoint: Endpoint) -> Dispatcher:
        return self.dispatchers[endpoint.transport]

    def warm_up(self, endpoint: Endpoint, backend_model: str) -> None:
        """Start ``backend_model`` on ``endpoint`` in the background with a one-token request, once at a time.

        On the ``parsl`` and ``globus`` transports the compute function launches the model server
        (submitting its job where the site schedules one) before it answers, so any request starts it.
        """
        if endpoint.id in self._warming:
            return
        payload = {"model": backend_model, "prompt": "warm-up", "max_tokens": 1}
        task = asyncio.create_task(self.dispatcher(endpoint).call(endpoint, "completions", payload))
        self._warming[endpoint.id] = task

        def done(finished: asyncio.Task[Any]) -> None:
            self._warming.pop(endpoint.id, None)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("starting %s on %s failed: %s", backend_model, endpoint.id, finished.exception())

        task.add_done_callback(done)

    async def _status(self, endpoint: Endpoint) -> Availability:
        return await self.dispatcher(endpoint).status(endpoint)
