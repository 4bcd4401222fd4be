"""Sharded ``hybrid``/``ckks`` rounds on a local Ray cluster started inside the test run.

Each group round runs on an aggregator actor with the keyless context; only bytes cross
(the group spec, the outcome with the group's SEAL ciphertexts); the coordinator adds the
group ciphertexts (tests/test_sharded_he.py has the checks in detail). "Exact": the
decrypted total rounds to the contributors' integer lane sums bit for bit.
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


def _cfg(mode: str) -> SimulationConfig:
    return SimulationConfig(
        clients=40, dim=16, dropout=0.0, mode=mode, tolerated_dropout=0.01,
        tolerated_corrupt=0.05, max_weight=2,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_sharded_he_on_ray_is_exact(cluster: Any, mode: str) -> None:
    r = simulate_sharded(_cfg(mode), 4, RayEngine(n_workers=2))
    assert r["status"] == "completed" and r["exact"] is True, r.get("abort")
    assert r["mode"] == mode and r["engine"] == "ray" and r["survivors"] == 40
    assert all(g["status"] == "completed" and g["survivors"] == 10 for g in r["groups"])


def test_killed_worker_aborts_its_he_groups_and_the_rest_is_published(cluster: Any) -> None:
    """Worker 0 (groups 0 and 2) killed mid-round: those groups are aborted with Ray's
    actor-death error, the other two groups' ciphertexts are added and decrypt exactly."""
    r = simulate_sharded(_cfg("hybrid"), 4, RayEngine(n_workers=2, kill={0: 3}))
    dead = [g for g in r["groups"] if g["status"] == "aborted"]
    assert [g["group"] for g in dead] == [0, 2]
    assert all("ActorDiedError" in g["reason"] for g in dead)
    assert r["status"] == "completed" and r["partial"] is True and r["exact"] is True
    assert r["survivors"] == 20
