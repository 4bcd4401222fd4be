"""Benchmarks use only the public API of secagg (issue 16: a refactor removed
``secagg.simulate._schedule``, which the suite imported, and nothing noticed)."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
EXEMPT = {"gpu_check.py"}
"""A launch-configuration probe for a lent GPU: it times the private CUDA kernels at chosen
grid shapes on purpose (docs/benchmarks.md); not part of the suite."""


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(source: str) -> list[str]:
    """``secagg`` names starting with ``_`` that ``source`` imports or reads: ``from
    secagg.x import _y``, ``import secagg._x``, and ``m._y`` where ``m`` was bound by an
    import from ``secagg``."""
    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "secagg":
            mod = node.module or ""
            found += [f"{mod}.{a.name}" for a in node.names if _private(a.name)]
            found += [mod for part in mod.split(".") if _private(part)]
            bound |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "secagg":
                    found += [a.name for part in a.name.split(".") if _private(part)]
                    bound.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and _private(node.attr)
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_checker_catches_what_broke_make_bench() -> None:
    """Known answers: the imports that broke ``make bench`` and the kernel access."""
    old = (
        "from secagg.simulate import _schedule\n"
        "from secagg.simulate import _ANSWERED_IN, _ORDER, SimulationConfig\n"
        "from secagg.kernels import cpu\n"
        "cpu._keystream_kernel(1)\n"
        "import secagg._private.x as p\n"
    )
    assert private_uses(old) == [
        "secagg.simulate._schedule",
        "secagg.simulate._ANSWERED_IN",
        "secagg.simulate._ORDER",
        "secagg._private.x",
        "cpu._keystream_kernel",
    ]
    assert private_uses("from secagg.simulate import schedule\nobj._x = 1\n") == []


def test_benchmarks_use_only_public_names() -> None:
    files = [p for p in sorted(BENCH.rglob("*.py")) if p.name not in EXEMPT]
    assert files
    bad = {str(p.relative_to(BENCH)): u for p in files if (u := private_uses(p.read_text()))}
    assert not bad, f"benchmarks use private secagg names: {bad}"
