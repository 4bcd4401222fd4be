"""Client-side checks of the server's DP offer (secagg.dp.policy)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("dp_accounting")

from secagg.dp.calibration import calibrate
from secagg.dp.policy import DPOffer, DPPolicy, check_offer
from secagg.dp.xnoise import make_plan
from secagg.errors import InfeasibleParameters, ServerMisbehaviour

CAL = calibrate(3.0, 1e-5, 20, n_clients=30, min_survivors=21, dim=5000, clip=1.0)
OFFER = DPOffer(CAL.dim, CAL.clip, CAL.gamma, CAL.beta, CAL.bits, 20, CAL.plan)
POLICY = DPPolicy(max_epsilon=3.0, delta=1e-5, max_rounds=50, max_clip=1.0)


def test_honest_offer_accepted_with_clients_own_epsilon() -> None:
    eps = check_offer(OFFER, POLICY)
    assert eps <= 3.0 and eps == pytest.approx(CAL.epsilon_rdp, rel=1e-9)


def test_attack_server_halves_the_noise() -> None:
    """Attack: a consistent plan with half the target variance (so epsilon ~ doubles).

    ``check_plan`` alone accepts it (it is self-consistent); the epsilon recomputation
    refuses it."""
    weak = make_plan(CAL.plan.target_variance // 2, 30, 21)
    with pytest.raises(ServerMisbehaviour, match="epsilon"):
        check_offer(dataclasses.replace(OFFER, plan=weak), POLICY)


def test_attack_server_inflates_clip_or_gamma() -> None:
    """Attack: same noise, larger sensitivity (clip beyond policy, or larger gamma)."""
    with pytest.raises(ServerMisbehaviour, match="clip"):
        check_offer(dataclasses.replace(OFFER, clip=2.0), POLICY)
    with pytest.raises(ServerMisbehaviour, match="epsilon"):
        check_offer(dataclasses.replace(OFFER, gamma=OFFER.gamma * 1.5), POLICY)


def test_attack_server_undercounts_rounds_or_exceeds_policy_rounds() -> None:
    with pytest.raises(ServerMisbehaviour, match="epsilon"):
        check_offer(dataclasses.replace(OFFER, rounds=40), POLICY)
    with pytest.raises(ServerMisbehaviour, match="rounds"):
        check_offer(dataclasses.replace(OFFER, rounds=60), POLICY)


def test_attack_server_tolerates_fewer_withholders_than_policy() -> None:
    with pytest.raises(ServerMisbehaviour, match="withholders"):
        check_offer(OFFER, dataclasses.replace(POLICY, min_withholders=1))


@given(
    st.integers(2, 60),
    st.floats(0.3, 1.0),
    st.integers(0, 3),
    st.integers(10**4, 10**8),
    st.sampled_from([0.02, 0.05, 0.1, 0.5]),
)
def test_plan_invariants(n: int, frac: float, w: int, target: int, xi: float) -> None:
    """Every feasible plan: honest noise >= T and total <= ratio * T for every s in [t, n]."""
    t = max(1, round(frac * n))
    if w >= t:
        return
    try:
        plan = make_plan(target, n, t, max_excess=xi, max_withholders=w)
    except InfeasibleParameters:
        return
    for s in range(t, n + 1):
        assert plan.honest_variance(s) >= target
        assert plan.residual_variance(s) / target <= plan.max_release_ratio
        assert sum(plan.component_variances[k] for k in plan.kept(s)) == plan.residual(s)
