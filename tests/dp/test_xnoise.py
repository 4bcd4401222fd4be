"""Dropout-robust noise components: exact removal for any survivor set, and plan checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

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
    assert plan.levels[0] == t and max(plan.levels) <= n
    assert list(plan.residuals) == sorted(plan.residuals, reverse=True)
    assert min(plan.component_variances) >= MIN_COMPONENT_VARIANCE
    assert plan.component_variances[-1] == plan.base_variance == -(-12_000_000 // (n - w))
    for s in range(t, n + 1):
        assert plan.honest_variance(s) >= plan.target_variance
        assert plan.residual_variance(s) / plan.target_variance <= plan.max_release_ratio
        kept = plan.kept(s)
        assert set(kept).isdisjoint(plan.removed(s))
        assert sorted((*kept, *plan.removed(s))) == list(range(plan.components))
        assert sum(plan.component_variances[k] for k in kept) == plan.residual(s)
    assert plan.removed(n) == tuple(range(plan.components - 1))  # all removable at s = n
    if w == 0:
        assert plan.residual_variance(n) < plan.target_variance + n  # exact up to ceil
        # Unit D = floor(xi R(n)), xi = 5%: excess at most 5% plus integer rounding.
        assert plan.max_release_ratio <= 1.05 + 2 * n / plan.target_variance


def test_binary_plan_known_answer() -> None:
    """``T = 12e6``, ``n = 100``, ``t = 41``, ``xi = 5%``: ``b = R(100) = 120,000``,
    ``D = 6,000``, ``R(41) = 292,683``, ``x(41) = ceil(172,683 / 6,000) = 29 < 2^5``: five
    removable components and the base, six in all (the ladder had 17)."""
    plan = make_plan(12_000_000, 100, 41)
    assert plan.component_variances == (6_000, 12_000, 24_000, 48_000, 96_000, 120_000)
    assert plan.keep_units(41) == 29 and plan.kept(41) == (0, 2, 3, 4, 5)
    assert plan.removed(41) == (1,)
    assert plan.residual(41) == 120_000 + 29 * 6_000 >= -(-12_000_000 // 41)
    assert plan.keep_units(100) == 0 and plan.kept(100) == (5,)
    assert plan.keep_units(70) == 9 and plan.removed(70) == (1, 2, 4)  # 31 - 9 = 0b10110


def test_small_rounds_or_t_near_n_keep_the_ladder() -> None:
    """Where the geometric ladder has fewer components it is kept (``n = 5``, ``t = 2``: four
    components, a level at every count, instead of the binary plan's six; ``n = 2``, ``t = 1``:
    two instead of six; ``n = 100``, ``t = 95``: two instead of three), removed as a prefix."""
    plan = make_plan(10**7, 5, 2)
    assert plan.ladder and plan.components == 4 and plan.levels == (2, 3, 4, 5)
    assert plan.component_variances == (1_666_666, 833_334, 500_000, 2_000_000)
    assert [plan.removed(s) for s in range(2, 6)] == [(), (0,), (0, 1), (0, 1, 2)]
    assert all(plan.residual(s) == -(-(10**7) // s) for s in range(2, 6))
    assert make_plan(10**7, 2, 1).components == 2
    near = make_plan(10**7, 100, 95)
    assert near.ladder and near.levels == (95, 100) and near.components == 2
    assert near.residual(99) == -(-(10**7) // 95)
    assert not make_plan(10**7, 100, 41).ladder and make_plan(10**7, 7, 7).components == 1


@settings(max_examples=300, deadline=None)
@given(
    target=st.integers(1, 10**10),
    n=st.integers(1, 300),
    t_frac=st.floats(0.01, 1.0),
    w_frac=st.floats(0.0, 0.99),
    xi=st.floats(0.001, 1.0),
)
def test_binary_plan_property(target: int, n: int, t_frac: float, w_frac: float, xi: float) -> None:
    """For every ``t <= s <= n``: honest variance ``>= T``, released ``<= max_release_ratio
    T``, removed and kept partition the components, every component ``>= 4``, and the count is
    ``m + 1 <= ceil(log2((R(t) - b) / D + 1)) + 1`` with ``m`` the least that covers ``R(t)``."""
    t = max(1, min(n, round(t_frac * n)))
    w = min(t - 1, int(w_frac * t))
    try:
        plan = make_plan(target, n, t, max_excess=xi, max_withholders=w)
    except InfeasibleParameters:  # base below 4, or a component past the exact sampler
        assume(False)
        return  # pragma: no cover
    b, d, m = plan.base_variance, plan.unit_variance, plan.removable
    r_t = -(-target // (t - w))
    assert b == -(-target // (n - w)) and d == max(MIN_COMPONENT_VARIANCE, int(xi * b))
    binary_m = (-(-(r_t - b) // d)).bit_length()  # least with b + (2^m - 1) D >= R(t)
    assert b + ((1 << binary_m) - 1) * d >= r_t
    assert binary_m == 0 or b + ((1 << (binary_m - 1)) - 1) * d < r_t
    assert plan.components <= math.ceil(math.log2((r_t - b) / d + 1)) + 1
    if plan.ladder:  # the geometric ladder, only when it has fewer components
        assert m <= binary_m and plan.components == len(plan.levels)
    else:
        assert m == binary_m
    assert min(plan.component_variances) >= MIN_COMPONENT_VARIANCE
    ratio = plan.max_release_ratio
    for s in range(t, n + 1):
        need = -(-target // (s - w))
        assert need <= plan.residual(s)
        assert plan.ladder or plan.residual(s) < need + d
        assert plan.honest_variance(s) >= target
        assert plan.residual_variance(s) / target <= ratio
        removed, kept = plan.removed(s), plan.kept(s)
        assert plan.components - 1 not in removed  # the base is never revealed
        assert sorted((*removed, *kept)) == list(range(plan.components))
        assert sum(plan.component_variances[k] for k in kept) == plan.residual(s)
    if w == 0:
        assert ratio <= 1 + xi + 2 * n * (1 + d) / target


@pytest.mark.parametrize("dropout", [0.0, 0.1, 0.3])
def test_removal_leaves_exactly_the_kept_components(dropout: float) -> None:
    """Sum of survivors' noise minus the server's removal == sum of their kept components."""
    n, t, dim, bits = 20, 14, 64, 40
    plan = make_plan(200_000, n, t)
    survivors = list(range(n - round(dropout * n)))
    removed = revealed_components(plan, survivors, list(range(n)))
    assert removed == plan.removed(len(survivors))
    added = np.zeros(dim, dtype=np.uint64)
    kept = np.zeros(dim, dtype=np.int64)
    for cid in survivors:
        keys = _keys(cid, plan)
        added += to_ring(client_noise(plan, keys, dim), bits)
        for k in plan.kept(len(survivors)):
            kept += component_noise(plan.component_variances[k], keys[k], dim)
    removal = removal_noise(
        plan, {cid: [_keys(cid, plan)[k] for k in removed] for cid in survivors},
        len(survivors), dim,
    )  # fmt: skip
    released = centre(added - to_ring(removal, bits), bits)
    assert (released == kept).all()
    # And what is kept has the per-survivor residual: check the exact variance bookkeeping.
    kept_var = len(survivors) * sum(plan.component_variances[k] for k in plan.kept(len(survivors)))
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
    """Attack: the server hands out a base or unit that looks fine but shrinks the kept noise
    (half the unit: every kept unit carries half its variance), one removable component
    too many (so a survivor count keeps fewer units), or the other reading of the components.

    Clients recompute the plan from its headline numbers and refuse any difference."""
    plan = make_plan(200_000, 20, 14)
    for bad in (
        dataclasses.replace(plan, unit_variance=plan.unit_variance // 2),
        dataclasses.replace(plan, base_variance=plan.base_variance // 2),
        dataclasses.replace(plan, removable=plan.removable + 1),
        dataclasses.replace(plan, ladder=True),  # reads the components another way
    ):
        with pytest.raises(ServerMisbehaviour, match="recomputation"):
            check_plan(bad, min_target_variance=1, max_withholders=0)


def test_attack_reveal_outside_own_subset_is_refused() -> None:
    """Attack: for ``s`` survivors the server wants a component that ``s`` keeps (so the
    released noise falls below target). ``revealed_components`` answers from the client's
    own ``|U|`` only, and the server's validation refuses a holder that reveals a kept one
    (``test_round.py``); here the arithmetic: no kept component is ever in the removed set,
    and the answer for ``|U| = 16`` is not the answer for an inflated ``|U| = 20``."""
    plan = make_plan(200_000, 20, 14)
    got = revealed_components(plan, list(range(16)), list(range(20)))
    assert set(got).isdisjoint(plan.kept(16))
    assert set(got) != set(plan.removed(20))
    assert set(plan.removed(20)) & set(plan.kept(16))


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
        make_plan(380_000_000 * 40, 100, 2)  # top binary component ~ R(2) - R(100)
    with pytest.raises(InfeasibleParameters, match="exceeds"):
        make_plan(10**12, 2, 1)
    plan = make_plan(200_000, 20, 14)
    with pytest.raises(ConfigurationError):
        plan.level(13)
    with pytest.raises(ConfigurationError):
        client_noise(plan, [bytes(32)], 4)
