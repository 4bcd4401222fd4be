"""Fixtures for the service tests: a loopback server with an in-memory or file store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
