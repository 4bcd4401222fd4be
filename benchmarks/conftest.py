"""Benchmarks are off in ``make test`` (testpaths = tests); ``make bench`` runs them."""

from __future__ import annotations

import os
import platform

import pytest


@pytest.fixture(scope="session")
def machine() -> str:
    """One line naming the machine, for result rows."""
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
