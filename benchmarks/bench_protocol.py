"""Protocol-core rounds in process (issue: protocol core, speed section).

Run: ``.venv/bin/python -m pytest benchmarks/bench_protocol.py --benchmark-only -s``.
Each case runs ``secagg.simulate.simulate`` once per round (pedantic, 1 round: a round is
seconds long) and prints the JSON report; ``seconds.wall`` is the round itself, without
generating inputs or checking the result.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from suite.common import sized, smoke

from secagg.policy import ClientPolicy
from secagg.simulate import SimulationConfig, simulate

FLOWER_POLICY = ClientPolicy(corrupt=0.0, dropout=0.0)
"""Flower's k=2, t=2 meets no target with a corrupt client: the clients of these cases
assume none (and no dropout) so that they accept it; the secure default refuses it."""

N, DIM_1M, DIM_100K = sized((100, 1_000_000, 100_000), (12, 1000, 1000))
CASES = {
    # Classic SecAgg: every client a neighbour of every other.
    "100x100k-full": SimulationConfig(
        clients=N, dim=DIM_100K, neighbors="all", dropout=0.1, drop_stage="masked"
    ),
    # Flower's example parameters (num_shares=3 -> k=2 neighbours, t=2): below target.
    "100x1M-k2-t2": SimulationConfig(
        clients=N,
        dim=DIM_1M,
        neighbors="2",
        threshold="2",
        dropout=0.1,
        drop_stage="masked",
        seed=8,  # a dropout pattern k=2, t=2 survives
        policy=FLOWER_POLICY,
    ),
    # Secure defaults (active adversary, 30% dropout tolerance).
    "100x1M-auto": SimulationConfig(clients=N, dim=DIM_1M, dropout=0.1, drop_stage="masked"),
}
MAY_ABORT = {"100x1M-k2-t2"}
"""k=2, t=2: the graph is drawn from the session id, so a fixed dropout set can still abort
the round (RESULTS.md: 11 of 12 runs did); an abort is the finding, not a failure."""


@pytest.mark.parametrize("case", list(CASES))
def test_round(benchmark: Any, case: str, machine: str) -> None:
    report: dict[str, Any] = benchmark.pedantic(
        simulate, args=(CASES[case],), rounds=1, iterations=1
    )
    benchmark.extra_info.update(
        machine=machine,
        status=report["status"],
        seconds=report["seconds"],
        bytes=report["bytes"],
        neighbors=report["neighbors"],
        threshold=report["threshold"],
    )
    print(f"\n{case}: {json.dumps(report['seconds'])} {report['status']} exact={report['exact']}")
    if case in MAY_ABORT and report["status"] == "aborted":
        return
    assert report["status"] == "completed" and report["exact"]


def test_flower_parameters_abort_rate(machine: str) -> None:
    """How often k=2, t=2 survives a uniformly random 10% dropout (100 clients, small dim)."""
    outcomes = []
    seeds = 3 if smoke() else 20
    for seed in range(seeds):
        cfg = SimulationConfig(
            clients=N,
            dim=1000,
            neighbors="2",
            threshold="2",
            dropout=0.1,
            drop_stage="random",
            seed=seed,
            policy=FLOWER_POLICY,
        )
        outcomes.append(simulate(cfg)["status"])
    aborted = outcomes.count("aborted")
    print(f"\nk=2,t=2 at 10% random dropout: {aborted}/{seeds} rounds aborted ({machine})")
