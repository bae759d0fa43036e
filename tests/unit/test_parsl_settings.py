"""The ``parsl`` keys of an endpoint, as ``check-config`` judges them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.config import ParslSettings


def test_strategy_period_defaults_to_parsls_and_must_be_positive() -> None:
    assert ParslSettings().strategy_period == 5
    assert ParslSettings(strategy_period=0.5).strategy_period == 0.5
    with pytest.raises(ValidationError, match="strategy_period"):
        ParslSettings(strategy_period=0)


def test_slurm_options_are_checked_against_the_provider() -> None:
    settings = ParslSettings(provider="slurm", provider_options={"partition": "debug", "exclusive": False})
    assert settings.provider_options["exclusive"] is False
    with pytest.raises(ValidationError, match="the slurm provider takes no option partiton"):
        ParslSettings(provider="slurm", provider_options={"partiton": "debug"})


def test_requests_the_nodes_hold_count_as_parsls_outstanding_tasks() -> None:
    # Parsl cancels blocks with no outstanding tasks, and adds blocks when tasks exceed the workers' slots; requests
    # down a node channel are no task at all, yet keep the node (and its model server) busy.
    from gateway.dispatch.parsl import build_executor

    executor = build_executor("test", ParslSettings(requests_per_node=256, workers_per_node=2))
    assert executor.outstanding() == 0
    executor.held = 1  # type: ignore[attr-defined]
    assert executor.outstanding() == 1
    executor.held = 256  # type: ignore[attr-defined]
    assert executor.outstanding() == 2  # a full node: its two workers' slots
    executor.held = 257  # type: ignore[attr-defined]
    assert executor.outstanding() == 3  # more than a node holds: Parsl may add a block


async def test_a_request_counts_from_its_hand_over_until_nobody_waits_for_its_events() -> None:
    from gateway.dispatch.parsl import build_executor
    from gateway.streaming.relay import LocalRelay

    executor = build_executor("test", ParslSettings(requests_per_node=256, workers_per_node=2))
    relay = LocalRelay(b"s" * 32)
    first, second = await relay.open(ttl=60), await relay.open(ttl=60)
    executor.hold(first)  # type: ignore[attr-defined]
    executor.hold(second)  # type: ignore[attr-defined]
    assert executor.held == 2  # type: ignore[attr-defined]
    first.close()
    first.close()
    assert executor.held == 1  # type: ignore[attr-defined]
    second.close()
    executor.hold(second)  # type: ignore[attr-defined]  # closed already: nothing to wait for
    assert executor.held == 0  # type: ignore[attr-defined]
