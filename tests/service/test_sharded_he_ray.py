"""A gRPC sharded ``hybrid`` round whose group rounds run on Ray actors
(``serve --engine ray``): exact, then a worker killed mid-round (docs/sharding.md).

A local Ray cluster is started here (``num_cpus=2``); the module is skipped without Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg.errors import RoundAborted
from secagg.messages import EncryptedInput

from .helpers import Deployment
from .test_sharded_he_grpc import G, N, _contexts, _expected, _front, _run
from .test_sharded_ray import kill_group_1_worker

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(ray_cluster: Any) -> Iterator[None]:
    """The run's shared local Ray cluster (tests/service/conftest.py)."""
    yield None


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_sharded_he_on_ray_actors_then_a_worker_killed(
    cluster: None, tmp_path: Path, mode: str
) -> None:
    d = Deployment(tmp_path / "store.sqlite", config={"engine": "ray", "ray_workers": 2}).start()
    try:
        names = d.enroll(N)
        secret, server_ctx = _contexts(mode)
        rid = d.create(names, 6, groups=G, mode=mode, he_context=server_ctx)
        out, xs, keys = _run(d, names, rid, secret)
        assert not [o.error for o in out.values() if o.error is not None]
        want = _expected(xs, keys, range(1, N + 1))
        for o in out.values():
            assert np.array_equal(o.result.sums, want)
        front = _front(d, rid).front
        assert front.result is not None and front.result.sums is None

        rid = d.create(names, 6, groups=G, mode=mode, he_context=server_ctx)
        killed: list[int] = []
        out, xs, keys = _run(
            d, names, rid, secret, kill_group_1_worker(d, rid, EncryptedInput, killed)
        )
        runner = _front(d, rid)
        asg = runner.front.assignment
        assert asg is not None and killed
        rest = [c for c in range(1, N + 1) if c not in asg.groups[1]]
        want = _expected(xs, keys, rest)
        for c in rest:
            assert out[c].error is None, out[c].error
            assert np.array_equal(out[c].result.sums, want)
        for c in asg.groups[1]:
            assert isinstance(out[c].error, RoundAborted), out[c].error
        row = runner.front.rows[1]
        assert not row.completed and "worker 1 lost" in row.reason
        assert runner.front.partial is True
    finally:
        d.stop()
