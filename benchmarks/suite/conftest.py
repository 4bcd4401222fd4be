"""Collects ``bench_*.py`` here, warms the kernels, and writes the results at the end.

``make bench-quick`` (or ``SECAGG_BENCH_PROFILE=quick pytest benchmarks/suite
--benchmark-only``) runs every suite of the profile; when the session ends the rows it
recorded are merged into ``benchmarks/suite/results/<profile>.json`` and
``benchmarks/report.py`` rewrites its own section of ``benchmarks/RESULTS.md`` and the plots.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from suite import common

_T0 = time.time()
_LOAD0 = os.getloadavg()[0]
_HERE = Path(__file__).resolve().parent


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` in this folder even when ``python_files`` does not name them
    (and only then, so that a project-wide ``python_files`` cannot collect them twice)."""
    if file_path.parent != _HERE or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's own collector takes it
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def prof() -> common.Profile:
    return common.profile()


@pytest.fixture(scope="session", autouse=True)
def _warm() -> None:
    """Load the Numba CPU kernels (on-disk cache; compiles on a cold cache) and TenSEAL
    before anything is timed."""
    import numpy as np

    from secagg import kernels
    from secagg.quantize import QuantSpec
    from secagg.simulate import SimulationConfig, simulate

    spec = QuantSpec(clip=1.0, bits=16, n_clients=4)
    with common.backend("cpu"):
        acc = kernels.mask_vector(np.zeros(4096), 1, spec, b"\x01" * 32, [])
        kernels.add_masks(acc, [])
        kernels.unpack(acc, spec, 4096)
    for mode in ("masked", "ckks", "hybrid"):
        simulate(SimulationConfig(clients=5, dim=2000, mode=mode, dropout=0.2, seed=1))


def pytest_report_header(config: pytest.Config) -> list[str]:
    p = common.profile()
    return [f"secagg bench profile: {p.name} (expected: {p.estimate})"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not common.ROWS:
        return
    sys.path.insert(0, str(common.BENCH))
    import report

    prof = common.profile()
    meta: dict[str, Any] = {
        "profile": prof.name,
        "wall_s": time.time() - _T0,
        "command": " ".join(["pytest", *session.config.invocation_params.args]),
        "date": common.now(),
        "machine": common.machine(),
        "versions": common.versions(),
        "load": f"{_LOAD0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "tests": session.testscollected,
        "failed": session.testsfailed,
    }
    path = common.results_path(prof)
    try:
        report.update_suite(common.ROWS, meta, path)
    except Exception as exc:  # the rows are in the JSON store; report.py can re-render
        print(f"\nsecagg bench: writing {path} failed: {type(exc).__name__}: {exc}")
        return
    session.config._secagg_bench_written = (path, meta)  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    written = getattr(terminalreporter.config, "_secagg_bench_written", None)
    prof = common.profile()
    if written is None:
        terminalreporter.write_line(f"secagg bench profile {prof.name}: no rows recorded")
        return
    path, meta = written
    terminalreporter.write_line(
        f"secagg bench profile {prof.name}: {len(common.ROWS)} rows, wall {meta['wall_s']:.0f} s;"
        f" results in {path} (plots in {path.parent / 'plots'})"
    )
