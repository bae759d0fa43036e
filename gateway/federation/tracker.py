"""Keeping each endpoint's availability current, in the background and never on the request path."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from gateway.federation.availability import Availability
from gateway.federation.registry import Endpoint

log = logging.getLogger("gateway.federation")

StatusProbe = Callable[[Endpoint], Awaitable[Availability]]

MAINTENANCE_FILE = "maintenance.json"


def read_maintenance(path: Path) -> dict[str, str]:
    """Clusters put under maintenance by ``inference-gateway maintenance``: cluster → message."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(cluster): str(message) for cluster, message in data.items()} if isinstance(data, dict) else {}


def write_maintenance(path: Path, clusters: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(clusters, indent=2, sort_keys=True))
    temporary.replace(path)


class AvailabilityTracker:
    """One background loop per endpoint asks its transport for the endpoint's state.

    Each loop sleeps the interval with jitter, so that many gateways (or many
    endpoints of one cluster) do not ask in step. A probe that fails or takes
    longer than ``timeout`` counts as ``offline``. Maintenance comes from the
    configuration and from the maintenance file, which is re-read on each round.
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint],
        probe: StatusProbe,
        *,
        interval: float,
        jitter: float,
        timeout: float,
        maintenance: dict[str, str],
        maintenance_file: Path,
    ) -> None:
        self.endpoints = list(endpoints)
        self._probe = probe
        self._interval = interval
        self._jitter = jitter
        self._timeout = timeout
        self._configured = dict(maintenance)
        self._file = maintenance_file
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()
        self.apply_maintenance()

    def apply_maintenance(self) -> None:
        clusters = {**self._configured, **read_maintenance(self._file)}
        for endpoint in self.endpoints:
            endpoint.maintenance = clusters.get(endpoint.cluster)

    async def observe(self, endpoint: Endpoint) -> Availability:
        """Ask once and record the answer."""
        try:
            seen = await asyncio.wait_for(self._probe(endpoint), self._timeout)
        except TimeoutError:
            seen = Availability("offline", detail=f"no status answer in {self._timeout:g} s")
        except Exception as exc:
            log.warning("status of %s failed: %s", endpoint.id, exc.__class__.__name__)
            seen = Availability("offline", detail=f"status failed: {exc.__class__.__name__}")
        endpoint.observe(seen)
        return seen

    async def refresh(self) -> None:
        """One round over every endpoint now (used at start and by tests)."""
        self.apply_maintenance()
        await asyncio.gather(*(self.observe(endpoint) for endpoint in self.endpoints))

    async def _watch(self, endpoint: Endpoint) -> None:
        while True:
            await asyncio.sleep(self._interval * (1 + self._rng.uniform(-self._jitter, self._jitter)))
            self.apply_maintenance()
            await self.observe(endpoint)

    async def start(self) -> None:
        await self.refresh()
        self._tasks = [asyncio.create_task(self._watch(endpoint)) for endpoint in self.endpoints]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
