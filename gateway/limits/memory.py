"""Rate limits counted in this process: right for one gateway, or for replicas that each get their own share."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.config import LimitSettings
from gateway.limits.base import CONCURRENT, REQUESTS, TOKENS, Plan, RateLimiter, Reservation, Rule


class _Cell:
    """One rule's state: a token bucket's level and when it was last brought up to date, or a count of running
    requests. It carries its rule's numbers so that a reservation reads nothing else."""

    __slots__ = ("capacity", "kind", "level", "rate", "rule", "stamp")

    def __init__(self, rule: Rule, stamp: float) -> None:
        self.rule = rule
        self.kind = rule.kind
        self.capacity = rule.capacity
        self.rate = rule.rate
        self.level = 0.0 if rule.kind == CONCURRENT else rule.capacity
        self.stamp = stamp


class MemoryRateLimiter(RateLimiter):
    """Token buckets (requests, tokens) and slot counts (concurrency), one cell per rule key, shared by plans."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings)
        self._clock = clock
        self._cells: dict[str, _Cell] = {}

    def prepare(self, rules: tuple[Rule, ...]) -> tuple[_Cell, ...]:
        cells = []
        for rule in rules:
            cell = self._cells.get(rule.key)
            if cell is None:
                cell = self._cells[rule.key] = _Cell(rule, self._clock())
            cells.append(cell)
        return tuple(cells)

    def _take(self, plan: Plan, tokens: int) -> Reservation:
        now = self._clock()
        cells: tuple[_Cell, ...] = plan.state
        for cell in cells:
            if cell.kind is CONCURRENT:
                if cell.level >= cell.capacity:
                    raise self.refuse(cell.rule, 1)
                continue
            level = cell.level + (now - cell.stamp) * cell.rate
            if level > cell.capacity:
                level = cell.capacity
            cell.level = level
            cell.stamp = now
            need = 1.0 if cell.kind is REQUESTS else tokens if tokens < cell.capacity else cell.capacity
            if level < need:
                raise self.refuse(cell.rule, (need - level) / cell.rate)
        for cell in cells:
            if cell.kind is REQUESTS:
                cell.level -= 1.0
            elif cell.kind is TOKENS:
                cell.level -= tokens
            else:
                cell.level += 1.0
        return (plan, tokens, "")

    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        plan, tokens, _ = reservation
        assert plan is not None
        for cell in plan.state:
            if cell.kind is CONCURRENT:
                cell.level -= 1.0
            elif cell.kind is TOKENS and used_tokens is not None:
                level = cell.level + tokens - used_tokens
                cell.level = level if level < cell.capacity else cell.capacity
