"""Client-side DP policy: refuse noise parameters from the server that are weaker than ours.

The server hands out the round's DP parameters (:class:`DPOffer`); a malicious server would
shrink the noise, loosen the clip, or under-count rounds. A client never trusts the server's
own privacy figures: :func:`check_offer` recomputes the plan (:func:`~secagg.dp.xnoise.check_plan`),
the sensitivity ``Delta_2^2`` from ``(clip, gamma, d', beta)``, the per-round ``rho`` for
the worst survivor count, and the RDP ``epsilon`` over the job's rounds, and compares each
with its own :class:`DPPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from secagg.dp.accountant import epsilon_rdp
from secagg.dp.calibration import round_rho
from secagg.dp.encoding import rounded_norm_bound_sq
from secagg.dp.rotation import padded_dim
from secagg.dp.xnoise import XNoisePlan, check_plan
from secagg.errors import ServerMisbehaviour

if TYPE_CHECKING:
    from secagg.dp.calibration import DPCalibration

__all__ = ["DPOffer", "DPPolicy", "check_offer"]


@dataclass(frozen=True)
class DPPolicy:
    """What a client accepts.

    Attributes
    ----------
    max_epsilon, delta:
        The client's budget for the whole job (RDP accountant at ``delta``).
    max_rounds:
        The most rounds of this job it will join.
    max_clip:
        The largest L2 clip norm it accepts (larger clips mean larger sensitivity per unit).
    min_withholders:
        Noise withholders the plan must tolerate (its view of colluding clients).
    """

    max_epsilon: float
    delta: float
    max_rounds: int
    max_clip: float
    min_withholders: int = 0


@dataclass(frozen=True)
class DPOffer:
    """The DP parameters of one round as the server sent them."""

    dim: int
    clip: float
    gamma: float
    beta: float
    bits: int
    rounds: int
    plan: XNoisePlan

    @classmethod
    def from_calibration(cls, cal: DPCalibration) -> DPOffer:
        """The offer a coordinator puts into :class:`secagg.params.RoundParams` (``dp=``)."""
        return cls(cal.dim, cal.clip, cal.gamma, cal.beta, cal.bits, cal.rounds, cal.plan)


def check_offer(offer: DPOffer, policy: DPPolicy) -> float:
    """Validate ``offer`` against ``policy``; return the job ``epsilon`` the client computed.

    Raises
    ------
    ServerMisbehaviour
        Naming the first number that is weaker than the policy or inconsistent.
    """
    if not 0 < offer.clip <= policy.max_clip:
        raise ServerMisbehaviour(f"clip {offer.clip} outside (0, policy {policy.max_clip}]")
    if not 1 <= offer.rounds <= policy.max_rounds:
        raise ServerMisbehaviour(f"{offer.rounds} rounds outside [1, policy {policy.max_rounds}]")
    if not (offer.gamma > 0 and 0 < offer.beta < 1 and offer.dim >= 1):
        raise ServerMisbehaviour("gamma, beta or dim out of range")
    check_plan(offer.plan, min_target_variance=1, max_withholders=policy.min_withholders)
    d = padded_dim(offer.dim)
    delta2_sq = rounded_norm_bound_sq(offer.clip, offer.gamma, d, offer.beta)
    plan = offer.plan
    worst = max(
        round_rho(plan, s, delta2_sq, d) for s in range(plan.min_survivors, plan.n_clients + 1)
    )
    eps = epsilon_rdp(worst, policy.delta, offer.rounds)
    if eps > policy.max_epsilon:
        raise ServerMisbehaviour(
            f"offered noise gives epsilon {eps:.4g} over {offer.rounds} rounds > policy "
            f"{policy.max_epsilon:.4g} (delta {policy.delta:.3g})"
        )
    return eps
