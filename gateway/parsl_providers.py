"""Parsl's providers and launchers under the names an endpoint's ``parsl`` settings give them.

The configuration checks ``provider_options`` against the named provider's signature, and the ``parsl`` transport
builds the provider and launcher; both take them from here. Importing Parsl takes about a second, so the
configuration imports this module only when an endpoint sets provider options.
"""

from __future__ import annotations

import inspect
from typing import Any

from parsl.launchers import AprunLauncher, MpiExecLauncher, SimpleLauncher, SingleNodeLauncher, SrunLauncher
from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

PROVIDERS: dict[str, type[Any]] = {"local": LocalProvider, "slurm": SlurmProvider, "pbspro": PBSProProvider}
LAUNCHERS: dict[str, type[Any]] = {
    "single_node": SingleNodeLauncher,
    "simple": SimpleLauncher,
    "srun": SrunLauncher,
    "mpiexec": MpiExecLauncher,
    "aprun": AprunLauncher,
}


def provider_options(provider: str) -> set[str]:
    """The keyword arguments the provider named ``provider`` takes."""
    return set(inspect.signature(PROVIDERS[provider]).parameters)
