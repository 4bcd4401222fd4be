"""A gRPC sharded round whose group rounds run on Ray actors (``serve --engine ray``),
a worker killed mid-round, then the next round (docs/sharding.md, "Over gRPC").

A local Ray cluster is started here (``num_cpus=2``); the module is skipped without Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg.errors import RoundAborted
from secagg.messages import MaskedInput, Message

from .helpers import Deployment, expected_sums
from .test_sharded_grpc import _J, DIM, G, N, _front, _inputs, _run

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[None]:
    """The run's shared local Ray cluster (tests/service/conftest.py)."""
    yield None


def kill_group_1_worker(
    d: Deployment, rid: bytes, on: type[Message], killed: list[int]
) -> Callable[[int], Callable[[Message], bool]]:
    """A ``hook`` for the sharded ``_run`` helpers: group 1's first member, about to send its
    first ``on`` message, kills group 1's Ray worker (once; ``killed`` gets its id)."""

    def hook(cid: int) -> Callable[[Message], bool]:
        def on_send(m: Message) -> bool:
            runner = _front(d, rid)
            asg = runner.front.assignment
            assert asg is not None and runner.hosts is not None
            if cid == asg.groups[1][0] and isinstance(m, on) and not killed:
                killed.append(cid)
                ray.kill(runner.hosts.actors[1], no_restart=True)  # group 1's worker
            return True

        return on_send

    return hook


def test_ray_worker_killed_mid_round_then_the_next_round_runs(
    cluster: None, tmp_path: Path
) -> None:
    d = Deployment(tmp_path / "store.sqlite", config={"engine": "ray", "ray_workers": 2}).start()
    try:
        names = d.enroll(N)
        rid = d.create(names, DIM, groups=G)
        xs, keys = _inputs()
        killed: list[int] = []
        out = _run(d, names, rid, xs, keys, hook=kill_group_1_worker(d, rid, MaskedInput, killed))
        asg = _front(d, rid).front.assignment
        assert asg is not None and killed
        rest = [c for c in range(1, N + 1) if c not in asg.groups[1]]
        want = expected_sums(_J(_front(d, rid).params), xs, keys, rest)
        for c in rest:
            assert out[c].error is None, out[c].error
            assert np.array_equal(out[c].result.sums, want)
        for c in asg.groups[1]:
            assert isinstance(out[c].error, RoundAborted), out[c].error
        d.store.verify_audit()
        done = json.loads(
            next(e.body for e in d.store.audit_entries(rid.hex()) if e.kind == "round_completed")
        )
        row = done["sharded"]["group_status"][1]
        assert row["status"] == "aborted" and "worker 1 lost" in row["reason"]
        assert done["sharded"]["partial"] is True

        rid2 = d.create(names, DIM, groups=G)  # the next round runs on fresh actors
        out2 = _run(d, names, rid2, xs, keys)
        want2: Any = expected_sums(_J(_front(d, rid2).params), xs, keys, range(1, N + 1))
        for o in out2.values():
            assert o.error is None, o.error
            assert np.array_equal(o.result.sums, want2)
    finally:
        d.stop()
