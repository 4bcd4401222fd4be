"""The job's privacy ledger in the store (service/privacy.py): figures, refusals, restarts.

Every figure is checked against ``dp-accounting`` called directly; the refusals record
nothing (no row, no audit entry); a re-opened store rebuilds the same ledger and a tampered
row is named.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

dp_accounting = pytest.importorskip("dp_accounting")

from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from secagg.dp.accountant import ddg_rho  # noqa: E402
from secagg.dp.calibration import DPCalibration, calibrate  # noqa: E402
from secagg.dp.encoding import rounded_norm_bound_sq  # noqa: E402
from secagg.dp.policy import DPOffer  # noqa: E402
from secagg.errors import ConfigurationError, PrivacyBudgetExceeded  # noqa: E402
from secagg.service.errors import (  # noqa: E402
    EXIT_AUDIT,
    EXIT_BUDGET,
    BudgetExhausted,
    LedgerMismatch,
    NotFound,
    exit_code_for,
    status_for,
)
from secagg.service.privacy import _TRIGGERS, AUDIT_CHARGE, JobLedger  # noqa: E402
from secagg.service.store import Store  # noqa: E402

DELTA = 1e-5


def _offer(cal: DPCalibration) -> DPOffer:
    return DPOffer(cal.dim, cal.clip, cal.gamma, cal.beta, cal.bits, cal.rounds, cal.plan)


@pytest.fixture(scope="module")
def cal() -> DPCalibration:
    # 8 sites, t = 6 (the ladder: levels 6, 7, 8), 4 rounds of epsilon 2 in total.
    return calibrate(2.0, DELTA, 4, n_clients=8, min_survivors=6, dim=30, clip=1.0)


@pytest.fixture(scope="module")
def coarse() -> DPCalibration:
    # xi = 0.5: the ladder, levels 6, 10 of n = 10, so 9 survivors keep much more than 6 or 10.
    return calibrate(2.0, DELTA, 4, n_clients=10, min_survivors=6, dim=30, clip=1.0, max_excess=0.5)


def _direct_rho(cal: DPCalibration, survivors: int) -> float:
    """KLS21's rho from the components left, without going through round_rho."""
    plan = cal.plan
    m = plan.removable
    if plan.ladder:  # levels s_j: components j .. m stay
        j = max(k for k, s in enumerate(plan.levels) if s <= survivors)
        ks: list[int] = list(range(j, m + 1))
    else:  # binary: the bits of x(s) = ceil((R(s) - b) / D) and the base stay
        x = -(-(-(-plan.target_variance // survivors) - plan.base_variance) // plan.unit_variance)
        ks = [k for k in range(m) if x >> k & 1] + [m]
    kept = sorted([plan.component_variances[k] for k in ks] * survivors)
    d = cal.padded_dim
    return ddg_rho(rounded_norm_bound_sq(cal.clip, cal.gamma, d, cal.beta), kept, d)


def _rdp(rhos: list[float], q: float) -> float:
    acct = RdpAccountant()
    for r in rhos:
        if q < 1:
            z = 1 / math.sqrt(2 * r)
            acct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
        else:
            acct.compose(dp_accounting.ZCDpEvent(r))
    return float(acct.get_epsilon(DELTA))


def _pld(rhos: list[float], q: float) -> float:
    acct = PLDAccountant()
    for r in rhos:
        event = dp_accounting.GaussianDpEvent(1 / math.sqrt(2 * r))
        acct.compose(dp_accounting.PoissonSampledDpEvent(q, event) if q < 1 else event)
    return float(acct.get_epsilon(DELTA))


def _audit_charges(store: Store) -> list[dict[str, object]]:
    return [e.data for e in store.audit_entries() if e.kind == AUDIT_CHARGE]


@pytest.mark.parametrize(("q", "survivors"), [(1.0, [8, 6, 7]), (0.5, [8, 8, 6])])
def test_figures_equal_dp_accounting_directly(
    cal: DPCalibration, q: float, survivors: list[int]
) -> None:
    store = Store(":memory:")
    ledger = JobLedger(store, "job", epsilon=50.0, delta=DELTA, sampling_rate=q)
    rhos: list[float] = []
    for i, s in enumerate(survivors):
        row = ledger.charge(f"r{i}", _offer(cal), s)
        rhos.append(_direct_rho(cal, s))
        assert math.isclose(row.rho, rhos[-1], rel_tol=1e-12)
        assert math.isclose(row.epsilon_rdp, _rdp(rhos, q), rel_tol=1e-9)
        # PLD composes with a discretization: order and grouping move it in the 1e-6s.
        assert math.isclose(row.epsilon_pld, _pld(rhos, q), rel_tol=1e-4)
        assert row.epsilon_pld <= row.epsilon_rdp
        assert row.budget_left == pytest.approx(50.0 - row.epsilon_rdp)
    assert ledger.spent() == ledger.rows[-1].epsilon_rdp


def test_calibrated_run_fits_its_budget_exactly(cal: DPCalibration) -> None:
    """The calibration's rounds, all at full strength, spend at most its worst-case epsilon
    (rounding of the integer variances leaves full-strength rounds a hair cheaper)."""
    store = Store(":memory:")
    ledger = JobLedger(store, "job", epsilon=2.0, delta=DELTA)
    for i in range(cal.rounds):
        ledger.admit(_offer(cal))
        ledger.charge(f"r{i}", _offer(cal), 8)
    assert ledger.spent() <= cal.epsilon_rdp <= 2.0
    assert ledger.spent() == pytest.approx(cal.epsilon_rdp, rel=1e-3)


def test_exhausted_budget_refuses_and_records_nothing(cal: DPCalibration) -> None:
    store = Store(":memory:")
    ledger = JobLedger(store, "job", epsilon=2.0, delta=DELTA)
    for i in range(cal.rounds):
        ledger.admit(_offer(cal))
        ledger.charge(f"r{i}", _offer(cal), 8)
    entries = len(store.audit_entries())
    with pytest.raises(BudgetExhausted, match=r"would bring epsilon to 2\.\d+ > budget 2"):
        ledger.admit(_offer(cal))
    assert len(store.audit_entries()) == entries
    assert len(ledger.rows) == cal.rounds
    assert len(JobLedger(store, "job").rows) == cal.rounds
    # One table: FAILED_PRECONDITION over gRPC, exit 9 on the command line, and still the
    # core's PrivacyBudgetExceeded for callers that catch that.
    exc = BudgetExhausted("x")
    assert isinstance(exc, PrivacyBudgetExceeded)
    assert status_for(exc)[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert exit_code_for(exc) == EXIT_BUDGET
    assert exit_code_for(LedgerMismatch("x")) == EXIT_AUDIT


def test_admission_takes_the_worst_survivor_count(coarse: DPCalibration) -> None:
    """A budget that would fit the round if it ended with 9 survivors, but not at its worst
    count, refuses: a round may end with any count in [t, n] and is charged what it ran."""
    offer = _offer(coarse)
    best, worst = _direct_rho(coarse, 9), max(_direct_rho(coarse, s) for s in range(6, 11))
    assert best < 0.8 * worst  # 9 survivors keep the components of level 6
    budget = (_rdp([best], 1.0) + _rdp([worst], 1.0)) / 2
    store = Store(":memory:")
    ledger = JobLedger(store, "job", epsilon=budget, delta=DELTA)
    with pytest.raises(BudgetExhausted):
        ledger.admit(offer)
    with pytest.raises(BudgetExhausted):
        ledger.admit(offer, worst_case_contributors=9)  # 6 survivors are as bad as 10
    assert store.audit_entries()[-1].kind == "dp_budget"  # nothing recorded
    assert ledger.worst_rho(offer) == pytest.approx(worst, rel=1e-12)
    with pytest.raises(ConfigurationError, match="outside"):
        ledger.admit(offer, worst_case_contributors=5)
    # What the refusal prevented: a round that happens to end with 9 survivors would fit.
    assert ledger.charge("lucky", offer, 9).budget_left > 0


def test_real_contributors_are_charged(coarse: DPCalibration) -> None:
    """Fewer survivors: the server removes fewer components, the round's rho is that of
    the components left for that count, and the ledger says how many were kept."""
    store = Store(":memory:")
    ledger = JobLedger(store, "job", epsilon=10.0, delta=DELTA)
    full = ledger.charge("a", _offer(coarse), 10)
    nine = ledger.charge("b", _offer(coarse), 9)
    six = ledger.charge("c", _offer(coarse), 6)
    assert (full.components_kept, nine.components_kept, six.components_kept) == (1, 2, 2)
    for row, s in [(full, 10), (nine, 9), (six, 6)]:
        assert row.contributor_count == s
        assert row.rho == pytest.approx(_direct_rho(coarse, s), rel=1e-12)
        assert row.honest_variance >= coarse.plan.target_variance
    assert nine.rho < full.rho
    bodies = _audit_charges(store)
    assert [b["contributor_count"] for b in bodies] == [10, 9, 6]
    for key in ("target_variance", "components_kept", "clip", "gamma", "bits", "delta2_sq"):
        assert key in bodies[0]
    assert bodies[-1]["budget_left"] == pytest.approx(10.0 - six.epsilon_rdp)
    store.verify_audit()


def test_bad_charges_record_nothing(cal: DPCalibration) -> None:
    store = Store(":memory:")
    ledger = JobLedger(store, "job", epsilon=10.0, delta=DELTA)
    ledger.charge(b"\x01" * 16, _offer(cal), 8)
    entries = len(store.audit_entries())
    with pytest.raises(ConfigurationError, match="already charged"):
        ledger.charge(b"\x01" * 16, _offer(cal), 7)
    with pytest.raises(ConfigurationError, match=r"5 survivors outside \[t=6, n=8\]"):
        ledger.charge("other", _offer(cal), 5)
    assert len(store.audit_entries()) == entries
    assert [r.round_id for r in ledger.rows] == ["01" * 16]


def test_restart_rebuilds_the_ledger(tmp_path: Path, cal: DPCalibration) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    ledger = JobLedger(store, "job", epsilon=2.0, delta=DELTA)
    for i, s in enumerate([8, 6, 7]):
        ledger.charge(f"r{i}", _offer(cal), s)
    before = ledger.as_dict()
    store.close()

    store = Store(path)
    again = JobLedger(store, "job")
    assert again.as_dict() == before
    with pytest.raises(ConfigurationError, match="cannot change"):
        JobLedger(store, "job", epsilon=3.0, delta=DELTA)
    with pytest.raises(NotFound, match="no privacy ledger"):
        JobLedger(store, "other-job")
    row = again.charge("r3", _offer(cal), 8)
    assert row.seq == 4
    with pytest.raises(BudgetExhausted):
        again.admit(_offer(cal))
    store.close()


def test_two_ledger_objects_share_one_store(tmp_path: Path, cal: DPCalibration) -> None:
    """A second process (or object) charging the job is seen before the next admission."""
    store = Store(tmp_path / "s.db")
    a = JobLedger(store, "job", epsilon=2.0, delta=DELTA)
    b = JobLedger(store, "job")
    for i in range(cal.rounds):
        (a if i % 2 else b).charge(f"r{i}", _offer(cal), 8)
    with pytest.raises(BudgetExhausted):
        a.admit(_offer(cal))
    assert len(a.rows) == len(b.rows) == cal.rounds


def _drop_triggers(db: sqlite3.Connection) -> None:
    for name in _TRIGGERS:
        db.execute(f"DROP TRIGGER {name}")


def _body(db: sqlite3.Connection, seq: int) -> dict[str, object]:
    (text,) = db.execute("SELECT body FROM privacy_ledger WHERE seq = ?", (seq,)).fetchone()
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


def _set_body(db: sqlite3.Connection, seq: int, body: dict[str, object]) -> None:
    db.execute("UPDATE privacy_ledger SET body = ? WHERE seq = ?", (json.dumps(body), seq))


def _lower_epsilon(db: sqlite3.Connection) -> None:
    b = _body(db, 2)
    _set_body(db, 2, {**b, "epsilon_rdp": 0.1, "budget_left": 1.9})


def _more_contributors(db: sqlite3.Connection) -> None:
    _set_body(db, 2, {**_body(db, 2), "contributor_count": 8})


def _drop_row(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM privacy_ledger WHERE seq = 2")


def _raise_budget(db: sqlite3.Connection) -> None:
    db.execute("UPDATE privacy_budgets SET epsilon = 100")


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (_lower_epsilon, "epsilon mismatch"),  # PrivacyLedger.from_json
        (_more_contributors, "noise figures differ|rho"),
        (_drop_row, "row 2 is missing"),
        (_raise_budget, "budget"),
    ],
)
def test_tampered_row_is_caught(
    tmp_path: Path, cal: DPCalibration, tamper: Callable[[sqlite3.Connection], None], match: str
) -> None:
    """Editing the ledger table behind the server's back (to hide spent budget) is named on
    the next open; without the verification the edited figures would be believed."""
    path = tmp_path / "s.db"
    store = Store(path)
    ledger = JobLedger(store, "job", epsilon=2.0, delta=DELTA)
    for i, s in enumerate([8, 6, 7]):
        ledger.charge(f"r{i}", _offer(cal), s)
    store.close()
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match=r"append-only|never changes"):
        tamper(db)  # the triggers refuse a plain edit...
    _drop_triggers(db)  # ...so the attacker drops them first
    tamper(db)
    db.commit()
    db.close()
    store = Store(path)
    with pytest.raises(LedgerMismatch, match=match):
        JobLedger(store, "job")
    store.close()


def test_consistent_rewrite_is_caught_by_the_audit_entries(
    tmp_path: Path, cal: DPCalibration
) -> None:
    """A table rewritten consistently (every figure recomputed for 8 contributors instead
    of 6) passes every recomputation; its rows no longer equal their dp_charge entries."""
    real, fake = tmp_path / "real.db", tmp_path / "fake.db"
    for path, counts in [(real, [8, 6, 7]), (fake, [8, 8, 7])]:
        store = Store(path)
        ledger = JobLedger(store, "job", epsilon=2.0, delta=DELTA)
        for i, s in enumerate(counts):
            ledger.charge(f"r{i}", _offer(cal), s)
        store.close()
    db = sqlite3.connect(real)
    _drop_triggers(db)
    db.execute("ATTACH DATABASE ? AS fake", (str(fake),))
    db.execute("DELETE FROM privacy_ledger")
    rows = db.execute("SELECT job, seq, round_id, body FROM fake.privacy_ledger").fetchall()
    audit = dict(db.execute("SELECT round_id, seq FROM audit WHERE kind = 'dp_charge'").fetchall())
    db.executemany(
        "INSERT INTO privacy_ledger (job, seq, round_id, body, audit_seq) VALUES (?, ?, ?, ?, ?)",
        [(j, s, r, b, audit[r]) for j, s, r, b in rows],
    )
    db.commit()
    db.close()
    store = Store(real)
    with pytest.raises(LedgerMismatch, match="differs from its audit entry"):
        JobLedger(store, "job")
    store.close()
