"""ckks and hybrid rounds over real gRPC on loopback."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import pytest

from secagg import ckks
from secagg.errors import SecAggError
from secagg.params import make_params
from secagg.quantize import lane_values
from secagg.server import StageTimeouts
from secagg.service.client import Policy
from secagg.service.errors import PolicyRefused

from .helpers import Deployment, run_threads, silent_from

DEADLINES = StageTimeouts.uniform(20.0)


def _contexts(n: int, dim: int, mode: str) -> tuple[bytes, bytes]:
    he = make_params(n, dim, mode=mode).he
    secret = ckks.make_secret_context(he)
    return secret, ckks.make_public_context(secret)


def _run(
    d: Deployment,
    names: list[str],
    rid: bytes,
    secret: bytes,
    xs: dict[int, np.ndarray[Any, Any]],
    keys: dict[int, bytes],
    silent: set[int] = frozenset(),  # type: ignore[assignment]
) -> dict[str, Any]:
    policy = Policy(allowed_modes=frozenset({"masked", "hybrid", "ckks"}))

    def job(cid: int) -> Any:
        with d.client(names[cid - 1], policy=policy) as c:
            joined = c.join(rid)
            hook = silent_from(3) if cid in silent else None
            return c.participate(
                joined, xs[cid], 1, rounding_key=keys[cid], on_send=hook, he_context=secret
            )

    return run_threads({str(c): (lambda c=c: job(c)) for c in xs})


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_he_round_exact_with_a_dropout(deployment: Deployment, mode: str) -> None:
    n, dim = 6, 3000
    names = deployment.enroll(n)
    secret, server_ctx = _contexts(n, dim, mode)
    rid = deployment.create(names, dim, DEADLINES, mode=mode, he_context=server_ctx)
    rng = np.random.default_rng(5)
    xs = {c: rng.normal(0, 1, dim) for c in range(1, n + 1)}
    keys = {c: secrets.token_bytes(32) for c in xs}
    out = _run(deployment, names, rid, secret, xs, keys, silent={4})
    assert not [o.error for o in out.values() if o.error]
    results = {int(k): o.result for k, o in out.items() if o.result is not None}
    assert set(results) == {1, 2, 3, 5, 6}
    spec = make_params(n, dim).quant
    expected = sum(lane_values(xs[c], 1, spec, keys[c]) for c in results)
    for r in results.values():
        assert r.contributors == (1, 2, 3, 5, 6)
        assert np.array_equal(r.sums, expected)
    assert deployment.admin is not None
    st = deployment.admin.wait(rid)
    assert st.status == "completed"
    assert [d.client_id for d in st.dropouts] == [4]


def test_ckks_publishes_after_k_uploads(deployment: Deployment) -> None:
    n, dim = 5, 500
    names = deployment.enroll(n)
    secret, server_ctx = _contexts(n, dim, "ckks")
    rid = deployment.create(
        names, dim, DEADLINES, mode="ckks", he_context=server_ctx, publish_after=3
    )
    xs = {c: np.full(dim, 0.5) for c in (1, 2, 3)}
    keys = {c: secrets.token_bytes(32) for c in xs}
    out = _run(deployment, names, rid, secret, xs, keys)
    assert not [o.error for o in out.values() if o.error]
    assert deployment.admin is not None
    st = deployment.admin.wait(rid)
    assert st.status == "completed" and list(st.contributors) == [1, 2, 3]


def test_server_refuses_a_context_with_a_secret_key(deployment: Deployment) -> None:
    names = deployment.enroll(4)
    secret, _ = _contexts(4, 100, "hybrid")
    with pytest.raises(SecAggError, match="secret key"):
        deployment.create(names, 100, DEADLINES, mode="hybrid", he_context=secret)
    with pytest.raises(SecAggError, match="CKKS context"):
        deployment.create(names, 100, DEADLINES, mode="hybrid")


def test_client_policy_keeps_ckks_opt_in(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    _, server_ctx = _contexts(3, 100, "ckks")
    rid = deployment.create(names, 100, DEADLINES, mode="ckks", he_context=server_ctx)
    with deployment.client(names[0]) as c, pytest.raises(PolicyRefused, match="ckks"):
        c.join(rid)
    policy = Policy(allowed_modes=frozenset({"ckks"}))
    with deployment.client(names[0], policy=policy) as c:
        joined = c.join(rid)
        with pytest.raises(PolicyRefused, match="CKKS key"):
            c.participate(joined, np.zeros(100))
