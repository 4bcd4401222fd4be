"""Sharded rounds on a local Ray cluster started inside the test run (no external service).

One module-scoped cluster (``num_cpus=2``); the sharded round of 1,000 clients in 20
groups uses ``dim=8`` and small groups (50 clients, ``k=4``) so the file stays short.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from secagg.simulate import SimulationConfig
from secagg.simulate_sharded import simulate_sharded

ray = pytest.importorskip("ray")

from secagg.service.ray_engine import RayEngine  # noqa: E402


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[Any]:
    """The run's shared local Ray cluster (tests/service/conftest.py)."""
    yield ray_cluster


def _cfg(clients: int) -> SimulationConfig:
    return SimulationConfig(
        clients=clients, dim=8, dropout=0.0, tolerated_dropout=0.01, tolerated_corrupt=0.05
    )


def test_thousand_clients_in_twenty_groups_exact(cluster: Any) -> None:
    r = simulate_sharded(_cfg(1000), 20, RayEngine(n_workers=2))
    assert r["status"] == "completed" and r["exact"] is True, r.get("abort")
    assert r["survivors"] == 1000 and r["engine"] == "ray" and r["workers"] == 2
    assert [g["size"] for g in r["groups"]] == [50] * 20
    assert all(g["status"] == "completed" and g["survivors"] == 50 for g in r["groups"])


def test_killed_worker_aborts_its_groups_and_the_next_round_runs(cluster: Any) -> None:
    """A worker killed mid-round (ray.kill after its first steps, between stages): its
    groups are aborted with Ray's actor-death error, the other groups' sum is published
    (exact, above min_contributors), and the next round runs on fresh workers. (The
    ``abort`` policy and the min_contributors floor: tests/test_sharding.py.)"""
    cfg = _cfg(80)
    r = simulate_sharded(cfg, 4, RayEngine(n_workers=2, kill={0: 3}))
    dead = [g for g in r["groups"] if g["status"] == "aborted"]
    assert [g["group"] for g in dead] == [0, 2]  # round-robin: worker 0 holds groups 0, 2
    assert all("ActorDiedError" in g["reason"] for g in dead)
    assert r["status"] == "completed" and r["partial"] is True and r["exact"] is True
    assert r["survivors"] == 40

    again = simulate_sharded(cfg, 4, RayEngine(n_workers=2))
    assert again["status"] == "completed" and again["exact"] is True
    assert again["survivors"] == 80 and not again["partial"]
