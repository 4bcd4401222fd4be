"""Whole rounds over real gRPC on loopback: exact results, dropouts, large vectors."""

from __future__ import annotations

import hashlib
import random
import secrets
from typing import Any

import numpy as np
import pytest

from secagg.errors import SecAggError
from secagg.rounds.base import Stage
from secagg.server import StageTimeouts
from secagg.service.client import Policy
from secagg.service.errors import AlreadyExists, PolicyRefused

from .helpers import Deployment, expected_sums, participate, run_threads, silent_from

SENDS = {"share_keys": 2, "masked_input": 3, "consistency": 4, "unmasking": 5}


def _digest(sums: np.ndarray[Any, Any]) -> str:
    return hashlib.sha256(sums.astype("<u8").tobytes()).hexdigest()


def test_fifty_clients_million_parameters_ten_percent_dropouts(deployment: Deployment) -> None:
    n, dim = 50, 1_000_000
    names = deployment.enroll(n)
    # Silent clients (streams left open) cost a full deadline in each stage they drop in;
    # honest ones need a fraction of it (signed share commitments: ~k signatures each).
    deadlines = StageTimeouts(
        advertise_keys=60.0, share_keys=15.0, masked_input=15.0, consistency=5.0, unmasking=5.0
    )
    rid = deployment.create(names, dim, deadlines)
    rng = random.Random(2024)
    ids = list(range(1, n + 1))
    # 10% drop, at random stages; seeded so each stage is exercised.
    plan = dict(
        zip(
            rng.sample(ids, 5),
            ["share_keys", "masked_input", "masked_input", "consistency", "unmasking"],
            strict=True,
        )
    )
    data = np.random.default_rng(7)
    xs = {cid: data.normal(0.0, 1.0, dim) for cid in ids}
    keys = {cid: secrets.token_bytes(32) for cid in ids}

    def job(cid: int) -> Any:
        hook = silent_from(SENDS[plan[cid]]) if cid in plan else None
        return participate(
            deployment, names[cid - 1], rid, xs[cid], rounding_key=keys[cid], on_send=hook
        )

    out = run_threads({str(cid): (lambda c=cid: job(c)) for cid in ids})
    errors = {k: o.error for k, o in out.items() if o.error}
    assert not errors

    assert deployment.admin is not None
    status = deployment.admin.wait(rid, timeout=60)
    assert status.status == "completed", status.abort_reason
    gone_before_input = {c for c, s in plan.items() if s in ("share_keys", "masked_input")}
    contributors = [c for c in ids if c not in gone_before_input]
    assert list(status.contributors) == contributors
    assert {d.client_id: d.stage for d in status.dropouts} == plan

    joined = deployment.client(names[0]).join(rid)
    expected = expected_sums(joined, xs, keys, contributors)
    assert status.aggregate_sha256 == _digest(expected)
    for cid in ids:
        result = out[str(cid)].result
        if cid in plan:
            assert result is None
        else:
            assert np.array_equal(result.sums, expected)
            assert result.contributors == tuple(contributors)

    deployment.store.verify_audit()
    done = [e for e in deployment.store.audit_entries(rid.hex()) if e.kind == "round_completed"]
    assert len(done) == 1 and done[0].data["aggregate_sha256"] == _digest(expected)
    assert {d["client_id"]: d["stage"] for d in done[0].data["dropouts"]} == plan


def test_ten_million_parameters_stream_in_chunks(deployment: Deployment) -> None:
    dim = 10_000_000
    names = deployment.enroll(3)
    rid = deployment.create(names, dim, StageTimeouts.uniform(60.0), bits=8)
    xs = {cid: np.full(dim, 0.25 * cid) for cid in (1, 2, 3)}
    keys = {cid: secrets.token_bytes(32) for cid in (1, 2, 3)}
    out = run_threads(
        {
            n: (lambda c=c, n=n: participate(deployment, n, rid, xs[c], rounding_key=keys[c]))
            for c, n in zip((1, 2, 3), names, strict=True)
        }
    )
    assert all(o.error is None for o in out.values()), [o.error for o in out.values()]
    joined = deployment.client(names[0]).join(rid)
    assert joined.max_message_bytes > 3 * (4 << 20)  # far beyond gRPC's 4 MiB default
    expected = expected_sums(joined, xs, keys, [1, 2, 3])
    for o in out.values():
        assert np.array_equal(o.result.sums, expected)
        assert np.allclose(o.result.mean, 0.5, atol=0.05)


def test_aggregate_preserves_structure_shapes_and_dtypes(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    shapes = {"w": (4, 5), "b": (5,), "s": ()}
    dim = sum(int(np.prod(s)) for s in shapes.values())
    rid = deployment.create(names, dim, StageTimeouts.uniform(10.0))

    def update(i: int) -> dict[str, np.ndarray[Any, Any]]:
        return {
            "w": np.full(shapes["w"], float(i), dtype=np.float32),
            "b": np.full(shapes["b"], -float(i), dtype=np.float64),
            "s": np.array(2.0 * i, dtype=np.float16),
        }

    def job(i: int, name: str) -> Any:
        with deployment.client(name) as c:
            return c.aggregate(rid, update(i))

    out = run_threads({n: (lambda i=i, n=n: job(i, n)) for i, n in enumerate(names, start=1)})
    for o in out.values():
        assert o.error is None, o.error
        agg = o.result
        assert list(agg.mean) == ["w", "b", "s"]
        for k, v in update(1).items():
            assert agg.mean[k].shape == v.shape and agg.mean[k].dtype == v.dtype
        assert np.allclose(agg.mean["w"], 2.0, atol=1e-3)
        assert np.allclose(agg.sum["b"], -6.0, atol=1e-2)
        assert agg.total_weight == 3


def test_weighted_round_returns_weighted_mean(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names, 100, StageTimeouts.uniform(10.0), max_weight=1000)
    weights = {names[0]: 1, names[1]: 3, names[2]: 6}

    def job(n: str, v: float) -> Any:
        with deployment.client(n) as c:
            return c.aggregate(rid, np.full(100, v), weight=weights[n])

    out = run_threads(
        {n: (lambda n=n, v=v: job(n, v)) for n, v in zip(names, (0.0, 1.0, 2.0), strict=True)}
    )
    agg = out[names[0]].result
    assert agg.total_weight == 10
    assert np.allclose(agg.mean, (0 * 1 + 1 * 3 + 2 * 6) / 10, atol=1e-3)


def test_plaintext_baseline_is_insecure_and_opt_in(deployment: Deployment) -> None:
    names = deployment.enroll(3)
    rid = deployment.create(names, 1000, StageTimeouts.uniform(10.0), mode="plaintext")
    with pytest.raises(PolicyRefused, match="INSECURE"):
        deployment.client(names[0], policy=Policy()).join(rid)
    xs = {c: np.full(1000, float(c)) for c in (1, 2, 3)}
    out = run_threads(
        {
            n: (lambda c=c, n=n: participate(deployment, n, rid, xs[c]))
            for c, n in enumerate(names, start=1)
        }
    )
    for o in out.values():
        assert o.error is None, o.error
        assert np.allclose(o.result.mean, 2.0, atol=1e-3)
    created = deployment.store.audit_entries(rid.hex())[0]
    assert created.data["insecure_plaintext"] is True and created.data["mode"] == "plaintext"


def test_client_policy_refuses_before_sending(deployment: Deployment) -> None:
    names = deployment.enroll(4)
    rid = deployment.create(names, 10, StageTimeouts.uniform(10.0))
    with pytest.raises(PolicyRefused, match="aggregates 10"):
        deployment.client(names[0], policy=Policy(expected_dim=11)).join(rid)
    with pytest.raises(PolicyRefused, match="threshold"):
        deployment.client(names[0], policy=Policy(min_threshold_fraction=0.99)).join(rid)
    pinned = {n: deployment.identities[n].public for n in names[:3]}  # c4 not pinned
    with pytest.raises(PolicyRefused, match="pinned"):
        deployment.client(names[0], policy=Policy(pinned_directory=pinned)).join(rid)
    full = {n: deployment.identities[n].public for n in names}
    deployment.client(names[0], policy=Policy(pinned_directory=full, expected_dim=10)).join(rid)


def test_round_aborts_when_too_few_clients_answer(deployment: Deployment) -> None:
    names = deployment.enroll(4)
    rid = deployment.create(names, 10, StageTimeouts.uniform(1.5), threshold="3", neighbors="all")
    out = run_threads(
        {n: (lambda n=n: participate(deployment, n, rid, np.zeros(10))) for n in names[:2]}
    )
    for o in out.values():
        assert isinstance(o.error, SecAggError)
    assert deployment.admin is not None
    st = deployment.admin.wait(rid, timeout=20)
    assert st.status == "aborted" and st.abort_stage == Stage.ADVERTISE_KEYS.value
    assert "threshold is 3" in st.abort_reason
    kinds = [e.kind for e in deployment.store.audit_entries(rid.hex())]
    assert kinds == ["round_created", "round_aborted"]


def test_concurrent_rounds_one_per_job(deployment: Deployment) -> None:
    names = deployment.enroll(9)
    shared = names[0]  # takes part in every round at once
    groups = {f"job-{j}": [shared, *names[1 + 2 * j : 3 + 2 * j]] for j in range(4)}
    rids = {
        job: deployment.create(g, 50_000, StageTimeouts.uniform(20.0), job=job)
        for job, g in groups.items()
    }
    with pytest.raises(AlreadyExists, match="running round"):
        deployment.create(groups["job-0"], 10, job="job-0")
    jobs = {
        f"{job}/{n}": (
            lambda job=job, n=n, i=i: participate(
                deployment, n, rids[job], np.full(50_000, float(i))
            )
        )
        for job, g in groups.items()
        for i, n in enumerate(g)
    }
    out = run_threads(jobs)
    assert all(o.error is None for o in out.values()), {k: o.error for k, o in out.items()}
    for key, o in out.items():
        assert np.allclose(o.result.mean, 1.0, atol=1e-3), key  # mean of 0, 1, 2
    assert deployment.admin is not None
    for rid in rids.values():
        assert deployment.admin.status(rid).status == "completed"


def test_sdk_refuses_split_view_parameters(deployment: Deployment) -> None:
    """Split-view attack (issue 11): the server picks n=6, k=5, t=3. The SDK's default
    policy, and the documented ``min_threshold_fraction=0.5``, accepted these parameters
    before the fix; now every client refuses at join, before sending anything."""
    names = deployment.enroll(6)
    rid = deployment.create(names, 10, neighbors="all", threshold="3")
    for policy in (Policy(), Policy(min_threshold_fraction=0.5)):
        for name in names:
            with pytest.raises(PolicyRefused, match=r"n=6, k=5, t=3: 2t=6 <= k\+1=6"):
                deployment.client(name, policy=policy).join(rid)


def test_sdk_refuses_an_update_with_another_layout(deployment: Deployment) -> None:
    """Layout attack (issue 11, item 7): the round carries the fingerprint of the model's
    layout; a site whose update has the same length but another layout is refused before
    anything is sent. Failed before the fix: the aggregate silently mixed parameters."""
    from secagg.service.tensors import fingerprint

    model = {"w": np.zeros((2, 3)), "b": np.zeros(4)}
    names = deployment.enroll(3)
    rid = deployment.create(names, 10, layout=fingerprint(model))
    client = deployment.client(names[0])
    assert client.join(rid).params.layout == fingerprint(model)
    with pytest.raises(PolicyRefused, match="layout"):
        client.aggregate(rid, {"w": np.zeros((3, 2)), "b": np.zeros(4)})
    assert deployment.admin is not None
    st = deployment.admin.status(rid)
    assert st.stage == Stage.ADVERTISE_KEYS.value  # nothing was sent
