"""Fixtures for the service tests: a loopback server with an in-memory or file store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secagg.service.logs import configure

from .helpers import Deployment

configure("warning")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A running server (file store under ``tmp_path``) with an admin client."""
    d = Deployment(tmp_path / "secagg.db").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One local Ray cluster (``num_cpus=2``) for every Ray test module of the run.

    Started inside the test run on first use (no external service), shut down at the end;
    a Ray start costs 7-9 s on the 2-core box, so the modules share it. Skips without Ray.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
