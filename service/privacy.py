"""The privacy ledger of a job: per-round DP charges in the store, refused over budget.

A job that runs distributed-DP rounds (docs/dp.md) has a budget ``(epsilon, delta)`` and a
client sampling rate ``q``. Around each DP round the coordinator calls:

* :meth:`JobLedger.admit` when the round is created: the *worst case* of the round (the most
  ``rho`` any survivor count the round can complete with would cost) must fit the budget, or
  :class:`~secagg.service.errors.BudgetExhausted` is raised and nothing is recorded;
* :meth:`JobLedger.charge` when the round has finished, with the *real* number of
  contributors: the round's ``rho`` for that count (fewer survivors keep more noise
  components, :func:`secagg.dp.calibration.round_rho`), the cumulative RDP epsilon (the
  accountant of record) and the PLD epsilon beside it, appended in one transaction to the
  ``privacy_ledger`` table and to the hash-chained audit log (``dp_charge``).

A round that ran is always charged, even past the budget (its release happened; refusing to
record it would under-report the spending): :meth:`admit` is what keeps a job inside its
budget, and any charge past it shows as a negative ``budget_left`` and refuses every later
round.

Re-opening the store rebuilds the accountant from the rows and verifies each of them (a
mismatch raises :class:`~secagg.service.errors.LedgerMismatch`): the noise plan is recomputed
from its headline numbers, ``Delta_2^2`` from ``(clip, gamma, d', beta)``, ``rho`` from the
plan and the contributors, every cumulative RDP epsilon by
:meth:`secagg.dp.accountant.PrivacyLedger.from_json`, the last PLD epsilon by the PLD
accountant, and every row equals the body of its ``dp_charge`` audit entry (whose hash chain
``secagg audit`` verifies), so a consistent rewrite of the table alone is caught too.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from secagg.dp.accountant import PrivacyLedger, RoundCharge, epsilon_pld
from secagg.dp.calibration import round_rho
from secagg.dp.encoding import rounded_norm_bound_sq
from secagg.dp.policy import DPOffer
from secagg.dp.rotation import padded_dim
from secagg.dp.xnoise import XNoisePlan, make_plan
from secagg.errors import ConfigurationError, InfeasibleParameters, StoreError
from secagg.service.audit import canonical_json, entry_hash
from secagg.service.errors import BudgetExhausted, LedgerMismatch, NotFound
from secagg.service.store import Store

__all__ = [
    "AUDIT_BUDGET",
    "AUDIT_CHARGE",
    "JobLedger",
    "LedgerRow",
    "ensure_schema",
    "ledger_jobs",
]

AUDIT_CHARGE = "dp_charge"
"""Audit kind of one round's charge."""
AUDIT_BUDGET = "dp_budget"
"""Audit kind of a job's budget, written once when its ledger is created."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy_budgets (
    job TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    sampling_rate REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS privacy_ledger (
    job TEXT NOT NULL,
    seq INTEGER NOT NULL,
    round_id TEXT NOT NULL,
    body TEXT NOT NULL,
    audit_seq INTEGER NOT NULL,
    PRIMARY KEY (job, seq),
    UNIQUE (job, round_id)
);
CREATE TRIGGER IF NOT EXISTS privacy_ledger_no_update BEFORE UPDATE ON privacy_ledger
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS privacy_ledger_no_delete BEFORE DELETE ON privacy_ledger
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS privacy_budgets_no_update BEFORE UPDATE ON privacy_budgets
BEGIN SELECT RAISE(ABORT, 'a privacy budget never changes'); END;
CREATE TRIGGER IF NOT EXISTS privacy_budgets_no_delete BEFORE DELETE ON privacy_budgets
BEGIN SELECT RAISE(ABORT, 'a privacy budget never changes'); END;
"""
_TRIGGERS = (
    "privacy_ledger_no_update",
    "privacy_ledger_no_delete",
    "privacy_budgets_no_update",
    "privacy_budgets_no_delete",
)
"""Triggers refuse edits of the tables (as of the audit log); the verification on open
catches whoever drops them."""


def ensure_schema(store: Store) -> None:
    """Create the ledger's two tables in ``store`` (idempotent)."""
    with store._lock:
        try:
            store._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot create the privacy ledger tables: {exc}") from exc


def ledger_jobs(store: Store) -> list[str]:
    """Jobs that have a privacy ledger in ``store``."""
    ensure_schema(store)
    return [str(r[0]) for r in store._query("SELECT job FROM privacy_budgets ORDER BY job")]


@dataclass(frozen=True)
class LedgerRow:
    """One round's charge as stored (and as written to its ``dp_charge`` audit entry).

    Noise parameters are those of the offer the round ran with: ``target_variance`` (``T``,
    integer units), ``components_kept`` (per contributor, after the server's removal),
    ``clip``, ``gamma``, ``beta``, ``bits``, ``delta2_sq`` (``Delta_2^2``) and the plan's
    headline numbers; ``rho`` is the round's zCDP cost for ``contributor_count`` (named so in
    the audit body too: ``contributors`` there is a list of ids, ``secagg audit`` counts it).
    """

    job: str
    round_id: str
    seq: int
    contributor_count: int
    dim: int
    padded_dim: int
    clip: float
    gamma: float
    beta: float
    bits: int
    delta2_sq: int
    target_variance: int
    n_clients: int
    min_survivors: int
    max_withholders: int
    max_excess: float
    components: int
    components_kept: int
    released_variance: int
    honest_variance: int
    rho: float
    epsilon_rdp: float
    epsilon_pld: float
    epsilon_budget: float
    delta: float
    sampling_rate: float
    budget_left: float

    @property
    def target_std(self) -> float:
        """Standard deviation of the released noise, per coordinate, in input units."""
        return math.sqrt(self.target_variance) / self.gamma

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_std": self.target_std}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LedgerRow:
        """Parse a stored row (``target_std`` is derived, not read)."""
        kinds = {
            "job": str,
            "round_id": str,
            "seq": int,
            "contributor_count": int,
            "dim": int,
            "padded_dim": int,
            "bits": int,
            "delta2_sq": int,
            "target_variance": int,
            "n_clients": int,
            "min_survivors": int,
            "max_withholders": int,
            "components": int,
            "components_kept": int,
            "released_variance": int,
            "honest_variance": int,
        }
        out: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            value = raw[name]
            kind = kinds.get(name, float)
            if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
                raise TypeError(f"{name} is not an integer")
            out[name] = kind(value)
        return cls(**out)

    def plan(self) -> XNoisePlan:
        """The noise plan, recomputed from its headline numbers."""
        return make_plan(
            self.target_variance,
            self.n_clients,
            self.min_survivors,
            max_excess=self.max_excess,
            max_withholders=self.max_withholders,
        )


def _check_offer(offer: DPOffer) -> tuple[int, int]:
    """The offer's ``d'`` and ``Delta_2^2``; its plan must equal its own recomputation."""
    p = offer.plan
    try:
        again = make_plan(
            p.target_variance,
            p.n_clients,
            p.min_survivors,
            max_excess=p.max_excess,
            max_withholders=p.max_withholders,
        )
    except InfeasibleParameters as exc:
        raise ConfigurationError(f"DP offer: invalid noise plan ({exc})") from None
    if again != p:
        raise ConfigurationError("DP offer: noise levels differ from their recomputation")
    d = padded_dim(offer.dim)
    return d, rounded_norm_bound_sq(offer.clip, offer.gamma, d, offer.beta)


class JobLedger:
    """The privacy ledger of job ``job`` in ``store`` (see the module docstring).

    ``JobLedger(store, job)`` opens an existing ledger (rebuilt and verified from its rows);
    with ``epsilon`` and ``delta`` it creates the ledger if the job has none, or checks that
    they are the stored budget (a budget never changes).

    Raises
    ------
    NotFound
        The job has no ledger and no budget was given.
    ConfigurationError
        A budget that differs from the stored one, or is out of range.
    LedgerMismatch
        A stored row disagrees with its recomputation or with its audit entry.
    """

    def __init__(
        self,
        store: Store,
        job: str,
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        sampling_rate: float = 1.0,
    ) -> None:
        if not job or len(job) > 128 or not job.isprintable():
            raise ConfigurationError("job names are 1..128 printable characters")
        ensure_schema(store)
        self.store = store
        self.job = job
        self._lock = threading.RLock()
        budget = store._query(
            "SELECT epsilon, delta, sampling_rate FROM privacy_budgets WHERE job = ?", (job,)
        )
        if budget:
            eps, dlt, q = (float(v) for v in budget[0])
            asked = (epsilon, delta, sampling_rate)
            if epsilon is not None and (eps, dlt, q) != asked:
                raise ConfigurationError(
                    f"job {job!r} has privacy budget epsilon {eps}, delta {dlt}, sampling rate "
                    f"{q}; it cannot change to {epsilon}, {delta}, {sampling_rate}"
                )
        elif epsilon is None or delta is None:
            raise NotFound(f"job {job!r} has no privacy ledger (no DP budget was set for it)")
        else:
            eps, dlt, q = float(epsilon), float(delta), float(sampling_rate)
            if not (eps > 0 and math.isfinite(eps) and 0 < dlt < 1 and 0 < q <= 1):
                raise ConfigurationError(
                    f"a privacy budget needs epsilon > 0, delta in (0, 1) and a sampling rate "
                    f"in (0, 1]: epsilon={eps}, delta={dlt}, q={q}"
                )
            self._create(eps, dlt, q)
        self.epsilon, self.delta, self.sampling_rate = eps, dlt, q
        self._rows: list[LedgerRow] = []
        self._ledger = PrivacyLedger(math.inf, dlt, q)
        with store._lock:
            self._load(store._db)

    def __repr__(self) -> str:
        return (
            f"JobLedger(job={self.job!r}, epsilon={self.epsilon}, delta={self.delta}, "
            f"rounds={len(self._rows)}, spent={self.spent():.4g})"
        )

    # -- reading ---------------------------------------------------------------------------

    @property
    def rows(self) -> tuple[LedgerRow, ...]:
        """The charges so far, in order."""
        with self._lock:
            self._sync()
            return tuple(self._rows)

    def spent(self) -> float:
        """Cumulative RDP epsilon of the rounds charged so far (0 before any)."""
        with self._lock:
            self._sync()
            return self._rows[-1].epsilon_rdp if self._rows else 0.0

    def left(self) -> float:
        """Budget left (negative only if a round ran without being admitted)."""
        return self.epsilon - self.spent()

    def as_dict(self) -> dict[str, Any]:
        """The ledger as JSON-ready data (``secagg privacy --json``)."""
        with self._lock:
            self._sync()
            rows = [r.as_dict() for r in self._rows]
            pld = self._rows[-1].epsilon_pld if self._rows else 0.0
        return {
            "job": self.job,
            "epsilon_budget": self.epsilon,
            "delta": self.delta,
            "sampling_rate": self.sampling_rate,
            "rigorous": self.sampling_rate == 1.0,
            "rounds_charged": len(rows),
            "epsilon_spent": self.spent(),
            "epsilon_pld": pld,
            "budget_left": self.left(),
            "accountant": "dp-accounting RdpAccountant over ZCDpEvent(rho) (of record); "
            "PLDAccountant over the Gaussian of the same rho (beside)",
            "rounds": rows,
        }

    # -- the two calls of the coordinator ----------------------------------------------------

    def worst_rho(self, offer: DPOffer, worst_case_contributors: int | None = None) -> float:
        """The most ``rho`` the round can cost: the maximum over every contributor count it
        can complete with, ``t .. m`` with ``m = worst_case_contributors`` (the most that can
        contribute, e.g. the participants that joined; default the plan's ``n``).

        Not monotone in the count (a count just above a level keeps more noise), hence the
        maximum over the whole range rather than one count.
        """
        d, delta2_sq = _check_offer(offer)
        plan = offer.plan
        top = plan.n_clients if worst_case_contributors is None else worst_case_contributors
        if not plan.min_survivors <= top <= plan.n_clients:
            raise ConfigurationError(
                f"worst-case contributors {top} outside [t={plan.min_survivors}, "
                f"n={plan.n_clients}]"
            )
        return max(round_rho(plan, s, delta2_sq, d) for s in range(plan.min_survivors, top + 1))

    def admit(self, offer: DPOffer, worst_case_contributors: int | None = None) -> float:
        """Check that the next round fits the budget in its worst case; record nothing.

        Returns the cumulative RDP epsilon the job would reach in that worst case.

        Raises
        ------
        BudgetExhausted
            If it would pass the budget (the message names both figures).
        """
        rho = self.worst_rho(offer, worst_case_contributors)
        with self._lock:
            self._sync()
            eps = self._ledger.would_spend(rho)
            if eps > self.epsilon:
                raise BudgetExhausted(
                    f"job {self.job!r}: the next round (worst case rho {rho:.4g}) would bring "
                    f"epsilon to {eps:.4g} > budget {self.epsilon:.4g} (delta {self.delta:.3g},"
                    f" {len(self._rows)} rounds charged, {self.spent():.4g} spent)"
                )
        return eps

    def charge(self, round_id: bytes | str, offer: DPOffer, contributors: int) -> LedgerRow:
        """Charge a finished round for its real ``contributors``; one row and one audit entry,
        in one transaction.

        Raises
        ------
        ConfigurationError
            If the round was charged before, or ``contributors`` is outside ``[t, n]``.
        """
        rid = round_id.hex() if isinstance(round_id, bytes) else str(round_id)
        d, delta2_sq = _check_offer(offer)
        plan = offer.plan
        rho = round_rho(plan, contributors, delta2_sq, d)  # raises outside [t, n]
        with self._lock:
            try:
                with self.store._tx() as db:
                    self._refresh(db)
                    row = self._charge_in(db, rid, offer, contributors, rho, d, delta2_sq)
            except BaseException:
                with self.store._lock:  # the in-memory accountant follows the store
                    self._load(self.store._db)
                raise
            self._rows.append(row)
        return row

    def _charge_in(
        self,
        db: sqlite3.Connection,
        rid: str,
        offer: DPOffer,
        contributors: int,
        rho: float,
        d: int,
        delta2_sq: int,
    ) -> LedgerRow:
        plan = offer.plan
        entry = self._ledger.charge(
            rid,
            rho,
            contributors=contributors,
            released_variance=plan.residual_variance(contributors),
            honest_variance=plan.honest_variance(contributors),
        )
        row = LedgerRow(
            job=self.job,
            round_id=rid,
            seq=len(self._rows) + 1,
            contributor_count=contributors,
            dim=offer.dim,
            padded_dim=d,
            clip=float(offer.clip),
            gamma=float(offer.gamma),
            beta=float(offer.beta),
            bits=offer.bits,
            delta2_sq=delta2_sq,
            target_variance=plan.target_variance,
            n_clients=plan.n_clients,
            min_survivors=plan.min_survivors,
            max_withholders=plan.max_withholders,
            max_excess=float(plan.max_excess),
            components=plan.components,
            components_kept=plan.components - plan.level(contributors),
            released_variance=entry.released_variance,
            honest_variance=entry.honest_variance,
            rho=rho,
            epsilon_rdp=entry.epsilon_after,
            epsilon_pld=self._pld([c.rho for c in self._ledger.charges]),
            epsilon_budget=self.epsilon,
            delta=self.delta,
            sampling_rate=self.sampling_rate,
            budget_left=self.epsilon - entry.epsilon_after,
        )
        body = row.as_dict()
        audit = self.store._append(db, AUDIT_CHARGE, rid, body)
        db.execute(
            "INSERT INTO privacy_ledger (job, seq, round_id, body, audit_seq) "
            "VALUES (?, ?, ?, ?, ?)",
            (self.job, row.seq, rid, canonical_json(body), audit.seq),
        )
        return row

    # -- internals ---------------------------------------------------------------------------

    def _pld(self, rhos: Sequence[float]) -> float:
        # Composition commutes: sorted, equal rho compose in one step (much faster).
        return epsilon_pld(sorted(rhos), self.delta, 1, self.sampling_rate)

    def _create(self, eps: float, dlt: float, q: float) -> None:
        with self.store._tx() as db:
            clash = db.execute("SELECT 1 FROM privacy_budgets WHERE job = ?", (self.job,))
            if clash.fetchone():  # created meanwhile by another process: checked on reload
                return
            db.execute(
                "INSERT INTO privacy_budgets (job, epsilon, delta, sampling_rate, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.job, eps, dlt, q, time.time()),
            )
            body = {"job": self.job, "epsilon": eps, "delta": dlt, "sampling_rate": q}
            self.store._append(db, AUDIT_BUDGET, "", body)

    def _sync(self) -> None:
        with self.store._lock:
            self._refresh(self.store._db)

    def _refresh(self, db: sqlite3.Connection) -> None:
        """Reload if another ledger object (or process) charged this job meanwhile."""
        (count,) = db.execute(
            "SELECT COUNT(*) FROM privacy_ledger WHERE job = ?", (self.job,)
        ).fetchone()
        if count != len(self._rows):
            self._load(db)

    def _load(self, db: sqlite3.Connection) -> None:
        """Rebuild the accountant from the rows, verifying each (see the module docstring)."""
        try:
            stored = db.execute(
                "SELECT seq, round_id, body, audit_seq FROM privacy_ledger WHERE job = ? "
                "ORDER BY seq",
                (self.job,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {exc}") from exc
        self._verify_budget(db)
        rows: list[LedgerRow] = []
        audit_seqs: list[int] = []
        for seq, rid, text, audit_seq in stored:
            audit_seqs.append(int(audit_seq))
            rows.append(self._verify_row(int(seq), str(rid), str(text)))
            if rows[-1].seq != len(rows):
                raise LedgerMismatch(
                    f"job {self.job!r}: privacy ledger row {len(rows)} is missing (found {seq})"
                )
        record = {
            "epsilon": math.inf,
            "delta": self.delta,
            "sampling_rate": self.sampling_rate,
            "charges": [
                asdict(
                    RoundCharge(
                        r.round_id,
                        r.rho,
                        r.contributor_count,
                        r.released_variance,
                        r.honest_variance,
                        r.epsilon_rdp,
                    )
                )
                for r in rows
            ],
        }
        try:
            ledger = PrivacyLedger.from_json(json.dumps(record))
        except ConfigurationError as exc:
            raise LedgerMismatch(f"job {self.job!r}: privacy ledger: {exc}") from None
        if rows:
            last = rows[-1]
            pld = self._pld([r.rho for r in rows])
            if not math.isclose(pld, last.epsilon_pld, rel_tol=1e-9):
                raise LedgerMismatch(
                    f"job {self.job!r}: privacy ledger row {last.seq} (round {last.round_id}): "
                    f"PLD epsilon {last.epsilon_pld} != recomputed {pld}"
                )
        for row, audit_seq in zip(rows, audit_seqs, strict=True):
            self._verify_audit(db, row, audit_seq)
        self._rows, self._ledger = rows, ledger

    def _verify_budget(self, db: sqlite3.Connection) -> None:
        """The budget row equals the job's ``dp_budget`` audit entry (the first one)."""
        want = {
            "job": self.job,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "sampling_rate": self.sampling_rate,
        }
        for (body,) in db.execute(
            "SELECT body FROM audit WHERE kind = ? ORDER BY seq", (AUDIT_BUDGET,)
        ):
            try:
                got = json.loads(body)
            except ValueError:
                continue  # the chain check (secagg audit) names a broken body
            if isinstance(got, dict) and got.get("job") == self.job:
                if got != want:
                    raise LedgerMismatch(
                        f"job {self.job!r}: privacy budget {want} differs from its audit "
                        f"entry {got}"
                    )
                return
        raise LedgerMismatch(f"job {self.job!r}: privacy budget has no dp_budget audit entry")

    def _verify_audit(self, db: sqlite3.Connection, row: LedgerRow, audit_seq: int) -> None:
        """The row equals the body of its ``dp_charge`` entry, whose own hash holds."""
        where = f"job {self.job!r}: privacy ledger row {row.seq} (round {row.round_id})"
        entry = db.execute(
            "SELECT ts, kind, round_id, body, prev_hash, hash FROM audit WHERE seq = ?",
            (audit_seq,),
        ).fetchone()
        if entry is None or (entry[1], entry[2]) != (AUDIT_CHARGE, row.round_id):
            raise LedgerMismatch(f"{where}: its audit entry #{audit_seq} is not its dp_charge")
        ts, kind, _, body, prev, digest = entry
        if entry_hash(prev, audit_seq, ts, kind, row.round_id, body) != digest:
            raise LedgerMismatch(f"{where}: its audit entry #{audit_seq} was altered")
        if body != canonical_json(row.as_dict()):
            raise LedgerMismatch(f"{where}: differs from its audit entry #{audit_seq}")

    def _verify_row(self, seq: int, rid: str, text: str) -> LedgerRow:
        where = f"job {self.job!r}: privacy ledger row {seq} (round {rid})"
        try:
            raw = json.loads(text)
            row = LedgerRow.from_dict(raw)
            plan = row.plan()
        except (ValueError, KeyError, TypeError, ConfigurationError) as exc:
            raise LedgerMismatch(f"{where}: malformed ({exc})") from None
        if (row.seq, row.round_id, row.job) != (seq, rid, self.job):
            raise LedgerMismatch(f"{where}: its key columns disagree with its body")
        budget = (row.epsilon_budget, row.delta, row.sampling_rate)
        if budget != (self.epsilon, self.delta, self.sampling_rate):
            raise LedgerMismatch(f"{where}: budget {budget} is not the job's")
        d = padded_dim(row.dim)
        delta2_sq = rounded_norm_bound_sq(row.clip, row.gamma, d, row.beta)
        if (d, delta2_sq) != (row.padded_dim, row.delta2_sq):
            raise LedgerMismatch(f"{where}: Delta_2^2 {row.delta2_sq} != recomputed {delta2_sq}")
        try:
            rho = round_rho(plan, row.contributor_count, delta2_sq, d)
        except ConfigurationError as exc:
            raise LedgerMismatch(f"{where}: {exc}") from None
        kept = plan.components - plan.level(row.contributor_count)
        derived = (
            kept,
            plan.components,
            plan.residual_variance(row.contributor_count),
            plan.honest_variance(row.contributor_count),
        )
        if derived != (
            row.components_kept,
            row.components,
            row.released_variance,
            row.honest_variance,
        ):
            raise LedgerMismatch(f"{where}: noise figures differ from the plan's")
        if not math.isclose(rho, row.rho, rel_tol=1e-12):
            raise LedgerMismatch(f"{where}: rho {row.rho} != recomputed {rho}")
        if not math.isclose(row.budget_left, row.epsilon_budget - row.epsilon_rdp, rel_tol=1e-12):
            raise LedgerMismatch(f"{where}: budget left {row.budget_left} is not budget - spent")
        return row
