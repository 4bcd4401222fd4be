"""Accountant figures against dp-accounting directly, calibration, and the per-job ledger."""

from __future__ import annotations

import math

import pytest

dp_accounting = pytest.importorskip("dp_accounting")

from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from secagg.dp.accountant import (  # noqa: E402
    PrivacyLedger,
    ddg_rho,
    epsilon_pld,
    epsilon_rdp,
    rho_for_epsilon,
    sum_tau,
)
from secagg.dp.calibration import calibrate, round_rho  # noqa: E402
from secagg.errors import ConfigurationError, PrivacyBudgetExceeded  # noqa: E402


def test_tau_matches_kls_iid_formula() -> None:
    """Equal variances: 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)) (KLS21 Thm 1)."""
    for sigma2, n in [(1.0, 10), (0.5, 100), (4.0, 3)]:
        iid = 10 * sum(math.exp(-2 * math.pi**2 * sigma2 * k / (k + 1)) for k in range(1, n))
        assert math.isclose(sum_tau([sigma2] * n), iid, rel_tol=1e-12)
    assert sum_tau([5.0]) == 0.0


def test_rho_known_answer() -> None:
    # Delta^2 = 100, 100 clients of variance 1e4 each: rho = 100 / 2e6 plus a negligible tau.
    rho = ddg_rho(100, [1e4] * 100, 2**20)
    assert math.isclose(rho, 5e-5, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("z", "rounds", "delta"), [(1.0, 1, 1e-5), (2.0, 10, 1e-6), (8.0, 100, 1e-5)]
)
def test_epsilon_matches_dp_accounting_directly(z: float, rounds: int, delta: float) -> None:
    rho = 1 / (2 * z * z)
    rdp = RdpAccountant()
    rdp.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert math.isclose(epsilon_rdp(rho, delta, rounds), rdp.get_epsilon(delta), rel_tol=1e-9)
    pld = PLDAccountant()
    pld.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert math.isclose(epsilon_pld(rho, delta, rounds), pld.get_epsilon(delta), rel_tol=1e-9)
    assert epsilon_pld(rho, delta, rounds) <= epsilon_rdp(rho, delta, rounds) + 1e-9


def test_sampled_figures_match_dp_accounting() -> None:
    rdp = RdpAccountant()
    rdp.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 50)
    assert math.isclose(epsilon_rdp(0.5, 1e-5, 50, 0.1), rdp.get_epsilon(1e-5), rel_tol=1e-9)


def test_rho_for_epsilon_hits_target() -> None:
    for eps, rounds in [(1.0, 1), (3.0, 100), (8.0, 1000)]:
        rho = rho_for_epsilon(eps, 1e-5, rounds)
        assert epsilon_rdp(rho, 1e-5, rounds) <= eps
        assert epsilon_rdp(rho * 1.0001, 1e-5, rounds) > eps * 0.999
    with pytest.raises(ConfigurationError):
        rho_for_epsilon(0.0, 1e-5, 1)


@pytest.mark.parametrize(("n", "t", "w"), [(100, 70, 0), (100, 70, 3), (10, 7, 0)])
def test_calibration_hits_target(n: int, t: int, w: int) -> None:
    cal = calibrate(
        3.0, 1e-5, 100, n_clients=n, min_survivors=t, dim=10**6, clip=1.0, max_withholders=w
    )
    assert cal.epsilon_rdp <= 3.0
    assert cal.epsilon_rdp >= 0.99 * 3.0  # not wastefully noisy
    assert cal.epsilon_pld <= cal.epsilon_rdp
    for s in range(t, n + 1):  # every survivor count, counting honest noise only
        assert round_rho(cal.plan, s, cal.delta2_sq, cal.padded_dim) <= cal.rho_per_round
    assert cal.wrap_probability <= 2.0**-40
    d = cal.as_dict()
    assert d["mechanism"] == "distributed-discrete-gaussian+xnoise" and d["rigorous"] is True
    assert math.isclose(d["target_std"], math.sqrt(cal.plan.target_variance) / cal.gamma)
    assert cal.bits <= 24


def test_ledger_refuses_round_over_budget() -> None:
    ledger = PrivacyLedger(epsilon=2.0, delta=1e-5)
    rho = rho_for_epsilon(2.0, 1e-5, 3)
    for r in range(3):
        ledger.charge(f"r{r}", rho, contributors=10, released_variance=1, honest_variance=1)
    assert ledger.spent() <= 2.0
    with pytest.raises(PrivacyBudgetExceeded, match="budget"):
        ledger.charge("r3", rho, contributors=10, released_variance=1, honest_variance=1)
    assert len(ledger.charges) == 3  # nothing recorded for the refused round
    with pytest.raises(ConfigurationError, match="already"):
        ledger.charge("r0", 1e-9, contributors=10, released_variance=1, honest_variance=1)
    assert ledger.charges[-1].epsilon_after == pytest.approx(ledger.spent())


def test_ledger_json_round_trip_and_tamper_check() -> None:
    ledger = PrivacyLedger(epsilon=2.0, delta=1e-5)
    rho = rho_for_epsilon(2.0, 1e-5, 4)
    for r in range(2):
        ledger.charge(f"r{r}", rho, contributors=9, released_variance=10, honest_variance=9)
    text = ledger.to_json()
    again = PrivacyLedger.from_json(text)
    assert again.charges == ledger.charges
    assert again.spent() == pytest.approx(ledger.spent())
    # A record edited to hide spending is refused (its stored epsilon no longer matches).
    tampered = text.replace(repr(rho), repr(rho / 10))
    assert tampered != text
    with pytest.raises(ConfigurationError, match="mismatch"):
        PrivacyLedger.from_json(tampered)
    with pytest.raises(ConfigurationError, match="malformed"):
        PrivacyLedger.from_json("{}")
