"""Profiles, the machine line, and the rows every benchmark of the suite records.

A profile (``SECAGG_BENCH_PROFILE=tiny|quick|full``, default ``quick``) fixes every size the
suites run. ``quick`` finishes in under 10 minutes on the 2-core development box; ``full``
runs the whole ranges of issue 7 (1,000 clients, 10^7 parameters) and takes hours; ``tiny``
is a smoke test (seconds) whose rows go to ``build/bench-tiny/`` unless told otherwise.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"

PROFILE_ENV = "SECAGG_BENCH_PROFILE"
RESULTS_ENV = "SECAGG_BENCH_RESULTS"
"""Overrides where the RESULTS file goes (its plots go to ``plots/`` beside it)."""


@dataclass(frozen=True)
class Profile:
    """Every size one run of the suite uses."""

    name: str
    estimate: str
    clients: tuple[int, ...]
    clients_dim: int
    dims: tuple[int, ...]
    dims_clients: int
    dropouts: tuple[float, ...]
    dropout_clients: int
    dropout_dim: int
    stage: tuple[int, int]
    grpc: tuple[int, int]
    grpc_reps: int
    grpc_timeout: float
    ckks_dim: int
    ckks_clients: int
    ckks_bits: tuple[int, ...]
    numba_round: tuple[int, int]
    numba_reps: int
    kernel_dim: int
    kernel_masks: int
    memory: tuple[tuple[int, int], ...]
    expansion_checks: tuple[tuple[int, int], ...]
    drop_stage: str = "masked"
    round_dropout: float = 0.1
    flower_full: tuple[int, int] = (50, 100_000)
    """Flower side by side, full graph (issue 16): clients x parameters, 10% dropout."""
    flower_sparse: tuple[int, int] = (100, 1_000_000)
    """Flower side by side, sparse graph: ours k=10, t=6; Flower num_shares=11, t=6."""
    flower_timeout: float = 1200.0
    extra: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        estimate="about 1 minute (smoke test; sizes far too small to mean anything)",
        clients=(5, 8),
        clients_dim=1000,
        dims=(100, 3000),
        dims_clients=6,
        dropouts=(0.0, 0.3),
        dropout_clients=10,
        dropout_dim=1000,
        stage=(6, 1000),
        grpc=(5, 1000),
        grpc_reps=1,
        grpc_timeout=90.0,
        ckks_dim=5000,
        ckks_clients=5,
        ckks_bits=(16,),
        numba_round=(6, 3000),
        numba_reps=1,
        kernel_dim=20_000,
        kernel_masks=4,
        memory=((6, 3000),),
        expansion_checks=((6, 512), (8, 300)),
        flower_full=(6, 1000),
        flower_sparse=(14, 1000),
        flower_timeout=120.0,
    ),
    "quick": Profile(
        name="quick",
        estimate="about 8 minutes on a quiet 2-core box, Flower rows included (15 at load 4-10)",
        clients=(10, 30, 100),
        clients_dim=100_000,
        dims=(10_000, 100_000, 1_000_000),
        dims_clients=20,
        dropouts=(0.0, 0.1, 0.3),
        dropout_clients=50,
        dropout_dim=100_000,
        stage=(50, 100_000),
        grpc=(20, 100_000),
        grpc_reps=3,
        grpc_timeout=60.0,
        ckks_dim=100_000,
        ckks_clients=100,
        ckks_bits=(8, 16),
        numba_round=(30, 100_000),
        numba_reps=2,
        kernel_dim=1_000_000,
        kernel_masks=16,
        memory=((100, 100_000), (20, 1_000_000)),
        expansion_checks=((30, 1 << 14), (100, 1 << 14)),
    ),
    "full": Profile(
        name="full",
        estimate=(
            "several hours on the 2-core box: 1,000-client rounds run every client in one "
            "process, about 10-30 minutes each"
        ),
        clients=(10, 30, 100, 300, 1000),
        clients_dim=100_000,
        dims=(10_000, 100_000, 1_000_000, 10_000_000),
        dims_clients=20,
        dropouts=(0.0, 0.05, 0.1, 0.2, 0.3),
        dropout_clients=50,
        dropout_dim=100_000,
        stage=(100, 1_000_000),
        grpc=(100, 100_000),
        grpc_reps=3,
        grpc_timeout=900.0,
        ckks_dim=1_000_000,
        ckks_clients=100,
        ckks_bits=(8, 16),
        numba_round=(100, 100_000),
        numba_reps=3,
        kernel_dim=10_000_000,
        kernel_masks=16,
        memory=((1000, 100_000), (20, 10_000_000)),
        expansion_checks=((100, 1 << 16), (1024, 1 << 10)),
    ),
}

VARIANTS: tuple[tuple[str, str], ...] = (
    ("masked", "all"),
    ("masked", "auto"),
    ("hybrid", "all"),
    ("hybrid", "auto"),
    ("ckks", "none"),
)
"""(mode, graph): ``all`` is classic SecAgg's full graph, ``auto`` the SecAgg+ graph chosen
by ``secagg.graph`` (active adversary, 30% dropout, 10% corrupt), ``none`` for ckks mode,
which has no key agreement."""

GRAPH_LABEL = {"all": "full", "auto": "SecAgg+", "none": "-"}


def variant_id(mode: str, graph: str) -> str:
    if graph == "none":
        return mode
    return f"{mode}-{GRAPH_LABEL[graph].lower().replace('+', 'plus')}"


def profile() -> Profile:
    name = os.environ.get(PROFILE_ENV, "quick").strip() or "quick"
    if name not in PROFILES:
        raise SystemExit(f"{PROFILE_ENV} must be one of {', '.join(PROFILES)}, got {name!r}")
    return PROFILES[name]


SMOKE_PROFILE = "tiny"
"""The profile ``make test`` runs every benchmark at (``make bench-smoke``)."""


def smoke() -> bool:
    """Whether this run is the smoke run: every benchmark once at a toy size, to prove it
    still runs against the current API (``make bench-smoke``, part of ``make test``).

    Benchmarks outside the suite read it to shrink their sizes, e.g.
    ``DIM = 1_000 if smoke() else 1_000_000``; sizes meant as targets (ratios, overheads)
    are not asserted in a smoke run.
    """
    return profile().name == SMOKE_PROFILE


def sized(normal: T, smoke_size: T) -> T:
    """``smoke_size`` in the smoke run, else ``normal``."""
    return smoke_size if smoke() else normal


def results_path(prof: Profile) -> Path:
    """RESULTS file for this run: ``benchmarks/RESULTS.md`` except for the tiny profile."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env).resolve()
    if prof.name == "tiny":
        return ROOT / "build" / "bench-tiny" / "RESULTS.md"
    return BENCH / "RESULTS.md"


@functools.cache
def machine() -> str:
    """One line naming the machine: CPU model, cores, Python and the libraries that matter."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, {platform.machine()}, Python {platform.python_version()}"


@functools.cache
def versions() -> str:
    from importlib import metadata

    out = []
    for name in ("numpy", "numba", "tenseal", "grpcio", "pycryptodome"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{name} {metadata.version(name)}")
    return ", ".join(out)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%MZ")


def command_for(nodeid: str, prof: Profile) -> str:
    """The command that re-runs one benchmark (from the repository root)."""
    return (
        f"{PROFILE_ENV}={prof.name} python -m pytest {shlex.quote(nodeid)} "
        "--benchmark-only -p no:cacheprovider"
    )


ROWS: list[dict[str, Any]] = []
"""Rows recorded by this session (``conftest.py`` hands them to ``report.py`` at the end)."""


def record(suite: str, key: str, nodeid: str, **data: Any) -> dict[str, Any]:
    """Add one row: what was measured plus the machine, the date and the command."""
    prof = profile()
    row = {
        "suite": suite,
        "id": f"{suite}/{key}",
        "profile": prof.name,
        "machine": machine(),
        "date": now(),
        "command": command_for(nodeid, prof),
        "load": os.getloadavg()[0],
        **data,
    }
    ROWS[:] = [r for r in ROWS if r["id"] != row["id"]]
    ROWS.append(row)
    return row


def median_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median wall seconds of ``reps`` calls, and the last result."""
    times = []
    out = None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


class backend:  # noqa: N801 -- used as a context manager, reads like a function
    """Set ``SECAGG_KERNELS`` for the duration of a block (read on every kernel call)."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.old: str | None = None

    def __enter__(self) -> None:
        self.old = os.environ.get("SECAGG_KERNELS")
        if self.name is None:
            os.environ.pop("SECAGG_KERNELS", None)
        else:
            os.environ["SECAGG_KERNELS"] = self.name

    def __exit__(self, *exc: object) -> None:
        if self.old is None:
            os.environ.pop("SECAGG_KERNELS", None)
        else:
            os.environ["SECAGG_KERNELS"] = self.old
