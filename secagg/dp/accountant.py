"""Privacy accounting for the distributed discrete Gaussian through Google's ``dp-accounting``.

Per round (Kairouz, Liu, Steinke, ICML 2021: the privacy theorem of the distributed discrete
Gaussian, with its lemma on sums of discrete Gaussians): if the released sum carries
independent discrete Gaussians of variances ``v_1 .. v_m`` from honest clients in every
coordinate, and one client's rounded vector has
``||r||_2^2 <= Delta_2^2``, the round is ``rho``-zCDP for "zero-out" neighbours (one client's
vector replaced by zero, its noise still in the sum; use ``4 Delta_2^2`` for replace-one) with

``rho = Delta_2^2 / (2 sum_k v_k) + tau d / 4``,
``tau = 10 sum_(k=2..m) exp(-2 pi^2 S_(k-1) v_k / (S_(k-1) + v_k))``,  ``S_k = v_1 + .. + v_k``,

(for ``m`` equal variances ``sigma^2`` this is KLS21's ``tau = 10 sum_(k=1..m-1)
exp(-2 pi^2 sigma^2 k / (k+1))``; ``sqrt(2 rho)`` is their ``epsilon``). ``tau`` is the
price of the sum of discrete Gaussians not being exactly a discrete Gaussian.

Across rounds the accountant of record is ``dp_accounting.rdp.RdpAccountant`` over
``ZCDpEvent(rho)`` (RDP curve ``alpha rho``, exact for a zCDP mechanism). The PLD figure
(``dp_accounting.pld.PLDAccountant`` over the Gaussian mechanism with the same ``rho``,
``z = 1 / sqrt(2 rho)``) is tighter but treats the discrete mechanism as a continuous
Gaussian with the same zCDP curve; it is reported beside, never used to admit a round.
Client sampling (``sampling_rate < 1``) amplifies only through that Gaussian view too
(``PoissonSampledDpEvent``), so those figures are flagged ``rigorous=False``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from secagg.errors import ConfigurationError, PrivacyBudgetExceeded

__all__ = [
    "PrivacyLedger",
    "RoundCharge",
    "ddg_rho",
    "epsilon_pld",
    "epsilon_rdp",
    "rho_for_epsilon",
    "sum_tau",
]


def _dp() -> object:
    try:
        import dp_accounting
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "DP accounting needs the optional dependency: pip install 'secagg[dp]'"
        ) from exc
    return dp_accounting


def sum_tau(variances: Sequence[float]) -> float:
    """KLS21's ``tau`` for a sum of independent discrete Gaussians with these variances."""
    if not variances or min(variances) <= 0:
        raise ConfigurationError("tau needs at least one positive variance")
    total = 0.0
    acc = float(variances[0])
    for v in variances[1:]:
        total += math.exp(-2.0 * math.pi**2 * acc * v / (acc + v))
        acc += v
    return 10.0 * total


def ddg_rho(delta2_sq: float, variances: Sequence[float], dim: int) -> float:
    """zCDP ``rho`` of one round: ``Delta_2^2 / (2 sum v) + tau d / 4`` (KLS21)."""
    if delta2_sq <= 0 or dim < 1:
        raise ConfigurationError("rho needs a positive sensitivity and dimension")
    return delta2_sq / (2.0 * math.fsum(variances)) + sum_tau(variances) * dim / 4.0


def _gaussian_event(rho: float, sampling_rate: float) -> object:
    dp = _dp()
    event = dp.GaussianDpEvent(1.0 / math.sqrt(2.0 * rho))  # type: ignore[attr-defined]
    if sampling_rate < 1.0:
        event = dp.PoissonSampledDpEvent(sampling_rate, event)  # type: ignore[attr-defined]
    return event


def _runs(seq: Sequence[float]) -> list[tuple[float, int]]:
    """Runs of equal consecutive ``rho`` (``dp-accounting`` composes a run in one step)."""
    out: list[tuple[float, int]] = []
    for r in seq:
        if out and out[-1][0] == r:
            out[-1] = (r, out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def _check(rho: float, rounds: int, delta: float, sampling_rate: float) -> None:
    if not (rho > 0 and rounds >= 1 and 0 < delta < 1 and 0 < sampling_rate <= 1):
        raise ConfigurationError(
            f"accounting needs rho > 0, rounds >= 1, delta and sampling rate in (0, 1]: "
            f"rho={rho}, rounds={rounds}, delta={delta}, q={sampling_rate}"
        )


def epsilon_rdp(
    rhos: Sequence[float] | float, delta: float, rounds: int = 1, sampling_rate: float = 1.0
) -> float:
    """``epsilon`` at ``delta`` of the composition (RDP accountant of ``dp-accounting``).

    ``rhos`` is one ``rho`` (composed ``rounds`` times) or the list of per-round ``rho``.
    With ``sampling_rate < 1`` each round is the Poisson-sampled Gaussian of the same ``rho``.
    """
    from dp_accounting.rdp import RdpAccountant

    dp = _dp()
    seq = [float(rhos)] * rounds if isinstance(rhos, int | float) else [float(r) for r in rhos]
    for r in seq:
        _check(r, 1, delta, sampling_rate)
    acct = RdpAccountant()
    for r, count in _runs(seq):
        if sampling_rate < 1.0:
            acct.compose(_gaussian_event(r, sampling_rate), count)
        else:
            acct.compose(dp.ZCDpEvent(r), count)  # type: ignore[attr-defined]
    return float(acct.get_epsilon(delta))


def epsilon_pld(
    rhos: Sequence[float] | float, delta: float, rounds: int = 1, sampling_rate: float = 1.0
) -> float:
    """``epsilon`` at ``delta`` from the PLD accountant (Gaussian view of each round)."""
    from dp_accounting.pld import PLDAccountant

    seq = [float(rhos)] * rounds if isinstance(rhos, int | float) else [float(r) for r in rhos]
    for r in seq:
        _check(r, 1, delta, sampling_rate)
    acct = PLDAccountant()
    for r, count in _runs(seq):
        acct.compose(_gaussian_event(r, sampling_rate), count)
    return float(acct.get_epsilon(delta))


def rho_for_epsilon(epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0) -> float:
    """The largest per-round ``rho`` whose ``rounds``-fold RDP composition meets ``epsilon``.

    Bisection on ``log rho`` to a relative width of ``1e-9``; the answer always satisfies
    ``epsilon_rdp(rho, delta, rounds) <= epsilon``.
    """
    if not epsilon > 0:
        raise ConfigurationError(f"target epsilon must be positive, got {epsilon}")
    lo, hi = 1e-12, 1e3
    if epsilon_rdp(lo, delta, rounds, sampling_rate) > epsilon:
        raise ConfigurationError(f"epsilon {epsilon} unreachable at delta {delta}")
    while hi / lo > 1 + 1e-9:
        mid = math.sqrt(lo * hi)
        if epsilon_rdp(mid, delta, rounds, sampling_rate) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class RoundCharge:
    """One round's entry in the ledger: what was run and what it cost."""

    round_id: str
    rho: float
    contributors: int
    released_variance: int
    honest_variance: int
    epsilon_after: float


@dataclass
class PrivacyLedger:
    """Per-job budget: refuses a round whose cumulative ``epsilon`` would exceed the budget.

    Sans-I/O: the service persists :attr:`charges` (one audit record per round).
    """

    epsilon: float
    delta: float
    sampling_rate: float = 1.0
    charges: list[RoundCharge] = field(default_factory=list)

    def spent(self) -> float:
        """Cumulative ``epsilon`` (RDP) of the rounds charged so far (0 before any)."""
        if not self.charges:
            return 0.0
        return epsilon_rdp([c.rho for c in self.charges], self.delta, 1, self.sampling_rate)

    def would_spend(self, rho: float) -> float:
        """Cumulative ``epsilon`` if one more round of ``rho`` ran."""
        rhos = [c.rho for c in self.charges] + [rho]
        return epsilon_rdp(rhos, self.delta, 1, self.sampling_rate)

    def to_json(self) -> str:
        """The ledger as JSON (the audit record; no pickle crosses any boundary)."""
        import json
        from dataclasses import asdict

        return json.dumps(
            {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "sampling_rate": self.sampling_rate,
                "charges": [asdict(c) for c in self.charges],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Rebuild a ledger written by :meth:`to_json`; re-derives every ``epsilon_after``.

        Raises
        ------
        ConfigurationError
            If the record is malformed or its stored figures do not match a recomputation.
        """
        import json

        try:
            raw = json.loads(text)
            ledger = cls(float(raw["epsilon"]), float(raw["delta"]), float(raw["sampling_rate"]))
            for c in raw["charges"]:
                entry = RoundCharge(
                    str(c["round_id"]),
                    float(c["rho"]),
                    int(c["contributors"]),
                    int(c["released_variance"]),
                    int(c["honest_variance"]),
                    float(c["epsilon_after"]),
                )
                again = ledger.charge(
                    entry.round_id,
                    entry.rho,
                    contributors=entry.contributors,
                    released_variance=entry.released_variance,
                    honest_variance=entry.honest_variance,
                )
                if not math.isclose(again.epsilon_after, entry.epsilon_after, rel_tol=1e-9):
                    raise ConfigurationError(f"ledger entry {entry.round_id!r}: epsilon mismatch")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"malformed privacy ledger: {exc}") from exc
        return ledger

    def charge(
        self,
        round_id: str,
        rho: float,
        *,
        contributors: int,
        released_variance: int,
        honest_variance: int,
    ) -> RoundCharge:
        """Record a round, or raise :class:`PrivacyBudgetExceeded` and record nothing."""
        if any(c.round_id == round_id for c in self.charges):
            raise ConfigurationError(f"round {round_id!r} already charged")
        eps = self.would_spend(rho)
        if eps > self.epsilon:
            raise PrivacyBudgetExceeded(
                f"round {round_id!r} would bring epsilon to {eps:.4g} > budget {self.epsilon:.4g}"
                f" (delta {self.delta:.3g}, {len(self.charges)} rounds spent)"
            )
        entry = RoundCharge(round_id, rho, contributors, released_variance, honest_variance, eps)
        self.charges.append(entry)
        return entry
