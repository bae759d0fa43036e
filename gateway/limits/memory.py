"""Rate limits counted in this process: right for one gateway, or for replicas that each get their own share."""

from __future__ import annotations

import time

from gateway.config import LimitSettings
from gateway.limits.base import CONCURRENT, REQUESTS, TOKENS, Plan, RateLimiter, Reservation, Rule


class _Cell:
    """A token bucket's level and when it was last brought up to date, or a count of running requests."""

    __slots__ = ("level", "stamp")

    def __init__(self, level: float) -> None:
        self.level = level
        self.stamp = time.monotonic()


class MemoryRateLimiter(RateLimiter):
    """Token buckets (requests, tokens) and slot counts (concurrency), one cell per rule key, shared by plans."""

    def __init__(self, settings: LimitSettings) -> None:
        super().__init__(settings)
        self._cells: dict[str, _Cell] = {}

    def prepare(self, rules: tuple[Rule, ...]) -> tuple[tuple[Rule, _Cell], ...]:
        cells = []
        for rule in rules:
            cell = self._cells.get(rule.key)
            if cell is None:
                cell = self._cells[rule.key] = _Cell(0.0 if rule.kind == CONCURRENT else rule.capacity)
            cells.append((rule, cell))
        return tuple(cells)

    async def _reserve(self, plan: Plan, tokens: int) -> Reservation:
        now = time.monotonic()
        cells: tuple[tuple[Rule, _Cell], ...] = plan.state
        for rule, cell in cells:
            if rule.kind == CONCURRENT:
                if cell.level >= rule.capacity:
                    raise self.refuse(rule, 1)
                continue
            level = min(rule.capacity, cell.level + (now - cell.stamp) * rule.rate)
            cell.level = level
            cell.stamp = now
            need = 1.0 if rule.kind == REQUESTS else min(float(tokens), rule.capacity)
            if level < need:
                raise self.refuse(rule, (need - level) / rule.rate)
        for rule, cell in cells:
            cell.level -= tokens if rule.kind == TOKENS else 1.0 if rule.kind == REQUESTS else -1.0
        return Reservation(plan, tokens)

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        assert reservation.plan is not None
        for rule, cell in reservation.plan.state:
            if rule.kind == CONCURRENT:
                cell.level -= 1.0
            elif rule.kind == TOKENS and used_tokens is not None:
                cell.level = min(rule.capacity, cell.level + reservation.tokens - used_tokens)
