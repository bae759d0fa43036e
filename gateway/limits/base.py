"""The rate-limit contract.

A ``RateLimiter`` is asked before a request goes to a backend (``reserve``) and told after it
ended (``settle``). A reservation takes one request and the request's estimated tokens (its
prompt's size plus ``max_tokens``) from every rule that applies to the user and model, or none
of them when any rule would be broken, in which case ``RateLimited`` (429) is raised naming the
rule and saying when to retry. Settling puts back the tokens the request did not use (or takes
the ones it used beyond the estimate) and frees its concurrency slot.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from gateway.config import LimitSettings, RateLimit
from gateway.errors import RateLimited

REQUESTS = "requests"
TOKENS = "tokens"
CONCURRENT = "concurrent"


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit on one scope: a bucket of ``capacity`` refilled at ``rate`` per second, or a slot count."""

    key: str
    kind: str
    capacity: float
    rate: float
    setting: str
    text: str


class Plan:
    """The rules for one user on one model, with whatever the limiter keeps to apply them fast (``state``)."""

    __slots__ = ("counts_tokens", "rules", "state")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self.counts_tokens = any(rule.kind == TOKENS for rule in rules)
        self.state: Any = None


# What one request took from its plan's rules, to be given back or topped up by ``settle``: the plan (None when
# nothing was taken), the tokens taken, and an id for a shared store. A plain tuple: made on every request.
Reservation = tuple[Plan | None, int, str]


def _rules(limit: RateLimit, scope: str, setting: str, who: str, where: str) -> list[Rule]:
    rules = []
    if limit.requests_per_second is not None:
        rate = limit.requests_per_second
        rules.append(
            Rule(
                f"{scope}:rps",
                REQUESTS,
                float(limit.burst or max(1.0, rate)),
                rate,
                f"{setting}.requests_per_second",
                f"{who} may send {rate:g} requests per second{where}",
            )
        )
    if limit.tokens_per_minute is not None:
        tpm = limit.tokens_per_minute
        rules.append(
            Rule(
                f"{scope}:tpm",
                TOKENS,
                float(tpm),
                tpm / 60.0,
                f"{setting}.tokens_per_minute",
                f"{who} may use {tpm} tokens per minute{where}",
            )
        )
    if limit.concurrent_requests is not None:
        count = limit.concurrent_requests
        rules.append(
            Rule(
                f"{scope}:running",
                CONCURRENT,
                float(count),
                0.0,
                f"{setting}.concurrent_requests",
                f"{who} may have {count} requests running at once{where}",
            )
        )
    return rules


def rules_for(settings: LimitSettings, user: str, model: str) -> tuple[Rule, ...]:
    """Every rule that applies to ``user`` calling ``model``: the user's own, the model's, the user's on the model."""
    if user in settings.users:
        mine = _rules(settings.users[user], f"u:{user}", f"users.{user}", f"user '{user}'", "")
    else:
        mine = _rules(settings.defaults, f"u:{user}", "defaults", f"user '{user}'", "")
    rules = mine
    per_model = settings.models.get(model)
    if per_model is not None:
        rules += _rules(per_model.total, f"m:{model}", f"models.{model}.total", f"model '{model}'", " for all users")
        rules += _rules(
            per_model.per_user, f"um:{user}:{model}", f"models.{model}.per_user", f"user '{user}'", f" to '{model}'"
        )
    return tuple(rules)


def _characters(value: Any) -> int:
    """Characters of text in a prompt, a list of prompts, or messages with string or multi-part content."""
    if value.__class__ is str:
        return len(value)
    total = 0
    if value.__class__ is list:
        for item in value:
            if item.__class__ is dict:
                content = item.get("content", item.get("text"))
                total += len(content) if content.__class__ is str else _characters(content)
            elif item.__class__ is str:
                total += len(item)
            elif item.__class__ is int:
                # A token id: count it as one token's worth of characters.
                total += 4
            elif item.__class__ is list:
                total += _characters(item)
    return total


def requested_tokens(op: str, body: dict[str, Any], assumed_max_tokens: int) -> int:
    """An upper estimate of a request's tokens: about four characters a prompt token, plus what it may generate."""
    if op == "chat/completions":
        # Validated: a list of messages. Plain text content, the usual case, is counted here without a call.
        characters = 0
        for message in body["messages"]:
            content = message.get("content")
            characters += len(content) if content.__class__ is str else _characters([message])
        prompt = characters // 4 + 1
    elif op == "completions":
        prompt = _characters(body.get("prompt")) // 4 + 1
    elif op == "messages":
        # Anthropic's Messages: the system text beside the messages; its max_tokens is required.
        prompt = (_characters(body.get("system")) + _characters(body.get("messages"))) // 4 + 1
    elif op == "responses":
        prompt = (_characters(body.get("instructions")) + _characters(body.get("input"))) // 4 + 1
        return prompt + int(body.get("max_output_tokens") or assumed_max_tokens)
    elif op == "embeddings":
        return _characters(body.get("input")) // 4 + 1
    else:
        # Rerank, score and the tokenizer generate nothing; their texts are in fields of several names.
        return _characters([value for name, value in body.items() if name != "model"]) // 4 + 1
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or assumed_max_tokens
    n = body.get("n")
    choices = n if isinstance(n, int) and n > 1 else 1
    return prompt + int(limit) * choices


class RateLimiter(ABC):
    """Reserves and settles requests against the configured rules; see the module docstring."""

    def __init__(self, settings: LimitSettings) -> None:
        self.settings = settings
        self.refusals: dict[str, int] = {}
        self._plans: dict[str, dict[str, Plan]] = {}
        limits = [settings.defaults, *settings.users.values()]
        limits += [limit for model in settings.models.values() for limit in (model.total, model.per_user)]
        self.enabled = any(
            limit.requests_per_second or limit.tokens_per_minute or limit.concurrent_requests for limit in limits
        )

    def _plan(self, user: str, model: str) -> Plan:
        plan = Plan(rules_for(self.settings, user, model))
        plan.state = self.prepare(plan.rules)
        self._plans.setdefault(user, {})[model] = plan
        return plan

    async def reserve(self, user: str, model: str, op: str, body: dict[str, Any]) -> Reservation | None:
        """Take this request from every rule that applies, or raise ``RateLimited``; None when no rule applies."""
        plans = self._plans.get(user)
        plan = plans.get(model) if plans is not None else None
        if plan is None:
            plan = self._plan(user, model)
        if not plan.rules:
            return None
        tokens = requested_tokens(op, body, self.settings.assumed_max_tokens) if plan.counts_tokens else 0
        taken = self._take(plan, tokens)
        # The in-process limiter answers at once; only a shared one has to wait for its store.
        return taken if taken.__class__ is tuple else await taken  # type: ignore[misc]

    def refuse(self, rule: Rule, wait: float) -> RateLimited:
        self.refusals[rule.setting] = self.refusals.get(rule.setting, 0) + 1
        seconds = max(1, math.ceil(wait))
        return RateLimited(
            f"Rate limit reached: {rule.text} (limits.{rule.setting}). Try again in {seconds} s.",
            headers={"retry-after": str(seconds)},
        )

    @abstractmethod
    def prepare(self, rules: tuple[Rule, ...]) -> Any:
        """What this limiter keeps with a plan to apply ``rules`` without looking anything up."""

    @abstractmethod
    def _take(self, plan: Plan, tokens: int) -> Reservation | Awaitable[Reservation]:
        """Take one request and ``tokens`` from every rule of ``plan`` or raise ``RateLimited``."""

    @abstractmethod
    def settle(self, reservation: Reservation, used_tokens: int | None) -> None:
        """Give back or take the difference between estimated and ``used_tokens`` (None: keep the estimate)."""

    async def start(self) -> None:
        """Connect to shared storage; called once when the gateway starts."""

    async def close(self) -> None:
        """Send what is still pending and disconnect; called once when the gateway stops."""

    async def check(self) -> str | None:
        """Why the limiter cannot count right now, or None; asked by the readiness probe."""
        return None
