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
