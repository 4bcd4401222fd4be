"""Dropout-robust noise components: exact removal for any survivor set, and plan checks."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.dp.encoding import centre, to_ring
from secagg.dp.xnoise import (
    MIN_COMPONENT_VARIANCE,
    XNoisePlan,
    check_plan,
    client_noise,
    component_key,
    component_noise,
    make_plan,
    removal_noise,
    revealed_components,
)
from secagg.errors import ConfigurationError, InfeasibleParameters, ServerMisbehaviour

SESSION = b"\x5a" * 32


def _seeds(cid: int, plan: XNoisePlan) -> list[bytes]:
    return [bytes([cid, k]) + bytes(30) for k in range(plan.components)]


def _keys(cid: int, plan: XNoisePlan) -> list[bytes]:
    return [component_key(s, SESSION, cid, k) for k, s in enumerate(_seeds(cid, plan))]


@pytest.mark.parametrize(("n", "t", "w"), [(100, 70, 0), (100, 70, 5), (20, 14, 0), (7, 7, 0)])
def test_every_survivor_count_meets_target_with_bounded_excess(n: int, t: int, w: int) -> None:
    plan = make_plan(12_000_000, n, t, max_withholders=w)
    assert plan.levels[0] == t and plan.levels[-1] == n
    assert list(plan.residuals) == sorted(plan.residuals, reverse=True)
    assert min(plan.component_variances) >= MIN_COMPONENT_VARIANCE
    assert sum(plan.component_variances) == plan.residuals[0]
    for s in range(t, n + 1):
        assert plan.honest_variance(s) >= plan.target_variance
        assert plan.residual_variance(s) / plan.target_variance <= plan.max_release_ratio
    if w == 0:
        assert plan.residual_variance(n) < plan.target_variance + n  # exact up to ceil
        # Level spacing xi = 5%: excess at most 5% plus integer rounding.
        assert plan.max_release_ratio <= 1.05 + n / plan.target_variance


@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.3])
def test_removal_leaves_exactly_the_kept_components(dropout: float) -> None:
    """Sum of survivors' noise minus the server's removal == sum of their kept components."""
    n, t, dim, bits = 20, 14, 64, 40
    plan = make_plan(200_000, n, t)
    survivors = list(range(n - round(dropout * n)))
    j = revealed_components(plan, survivors, list(range(n)))
    assert j == range(plan.level(len(survivors)))
    added = np.zeros(dim, dtype=np.uint64)
    kept = np.zeros(dim, dtype=np.int64)
    for cid in survivors:
        keys = _keys(cid, plan)
        added += to_ring(client_noise(plan, keys, dim), bits)
        for k in range(j.stop, plan.components):
            kept += component_noise(plan.component_variances[k], keys[k], dim)
    removed = removal_noise(
        plan, {cid: _keys(cid, plan)[: j.stop] for cid in survivors}, len(survivors), dim
    )
    released = centre(added - to_ring(removed, bits), bits)
    assert (released == kept).all()
    # And what is kept has the per-survivor residual R_j: check the exact variance bookkeeping.
    kept_var = len(survivors) * sum(plan.component_variances[j.stop :])
    assert kept_var == plan.residual_variance(len(survivors))
    assert kept_var >= plan.target_variance


def test_components_are_independent_streams() -> None:
    plan = make_plan(200_000, 20, 14)
    keys = _keys(3, plan)
    assert len(set(keys)) == plan.components
    assert keys != _keys(4, plan)
    a = component_noise(plan.component_variances[0], keys[0], 32)
    assert (a == component_noise(plan.component_variances[0], keys[0], 32)).all()


def test_precomputed_keys_do_not_depend_on_the_round() -> None:
    """Keys drawn ahead of the round: fixed by (seed, salt, k), distinct per salt and k, and
    never equal to a round-bound key of the same seed (different HKDF salt and info)."""
    seed, salt = bytes(range(32)), b"\x11" * 32
    pre = component_key(seed, SESSION, 3, 2, precompute_salt=salt)
    assert pre == component_key(seed, b"\x00" * 32, 9, 2, precompute_salt=salt)
    assert pre != component_key(seed, SESSION, 3, 1, precompute_salt=salt)
    assert pre != component_key(seed, SESSION, 3, 2, precompute_salt=b"\x12" * 32)
    assert pre != component_key(seed, SESSION, 3, 2)
    with pytest.raises(ConfigurationError, match="salt"):
        component_key(seed, SESSION, 3, 2, precompute_salt=b"short")


def test_attack_server_pads_survivor_list_with_duplicates() -> None:
    """Attack: the server lists a survivor twice so clients reveal more excess seeds.

    Without the duplicate check the level would be computed from the padded count and the
    released noise would fall below target (failed before ``revealed_components`` checked)."""
    plan = make_plan(200_000, 20, 14)
    with pytest.raises(ServerMisbehaviour, match="duplicates"):
        revealed_components(plan, [*range(14), 0, 1, 2, 3, 4, 5], list(range(20)))


def test_attack_server_invents_survivors_outside_roster() -> None:
    plan = make_plan(200_000, 20, 14)
    with pytest.raises(ServerMisbehaviour, match="roster"):
        revealed_components(plan, [*range(15), 99], list(range(20)))


def test_attack_too_few_survivors_reveals_nothing() -> None:
    plan = make_plan(200_000, 20, 14)
    with pytest.raises(ServerMisbehaviour, match="threshold"):
        revealed_components(plan, list(range(13)), list(range(20)))


def test_attack_doctored_plan_levels() -> None:
    """Attack: the server hands out residuals that look fine but shrink the kept noise.

    Clients recompute the plan from its headline numbers and refuse any difference."""
    plan = make_plan(200_000, 20, 14)
    bad = XNoisePlan(
        plan.target_variance,
        plan.n_clients,
        plan.min_survivors,
        plan.max_withholders,
        plan.max_excess,
        plan.levels,
        (plan.residuals[0], *(r // 2 for r in plan.residuals[1:])),
    )
    with pytest.raises(ServerMisbehaviour, match="recomputation"):
        check_plan(bad, min_target_variance=1, max_withholders=0)


def test_attack_weaker_target_or_fewer_withholders_than_policy() -> None:
    plan = make_plan(200_000, 20, 14, max_withholders=1)
    check_plan(plan, min_target_variance=200_000, max_withholders=1)
    with pytest.raises(ServerMisbehaviour, match="policy"):
        check_plan(plan, min_target_variance=300_000, max_withholders=1)
    with pytest.raises(ServerMisbehaviour, match="withholders"):
        check_plan(plan, min_target_variance=1, max_withholders=2)


def test_plan_refuses_bad_numbers() -> None:
    with pytest.raises(ConfigurationError):
        make_plan(1000, 10, 11)
    with pytest.raises(ConfigurationError):
        make_plan(1000, 10, 5, max_withholders=5)
    with pytest.raises(InfeasibleParameters, match="too small"):
        make_plan(100, 100, 70)
    with pytest.raises(InfeasibleParameters, match="exceeds"):
        make_plan(10**12, 2, 1)
    plan = make_plan(200_000, 20, 14)
    with pytest.raises(ConfigurationError):
        plan.level(13)
    with pytest.raises(ConfigurationError):
        client_noise(plan, [bytes(32)], 4)
