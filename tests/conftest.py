"""Fixtures shared by several tiers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A single-node Slurm cluster of the test session's own (see ``tests/slurm/cluster.py``).

    Missing Slurm or munge fails the tests that use it, with the command that installs them.
    """
    # Not under pytest's temporary folder: munged refuses a socket below a folder that others cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="inference-gateway-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
