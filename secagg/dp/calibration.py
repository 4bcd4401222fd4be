"""Calibration: from a target ``(epsilon, delta)``, rounds and clients to noise, scale and lanes.

Given the budget, the number of rounds, ``n`` clients, threshold ``t``, the tolerated noise
withholders ``w``, the dimension and the clip norm ``c``:

1. ``rho`` per round: the largest whose ``rounds``-fold RDP composition meets ``(epsilon,
   delta)`` (:func:`secagg.dp.accountant.rho_for_epsilon`);
2. scale ``gamma = sqrt(d' / (4 kappa)) / c``, so the rounding term ``d'/4`` of ``Delta_2^2``
   is a fraction ``kappa`` (``rounding_inflation``) of ``(c gamma)^2`` (KLS21 section 5:
   large enough ``gamma`` makes rounding nearly free in privacy, at the cost of bits);
3. target variance ``T = ceil(Delta_2^2 / (2 rho))``, raised by ``0.1%`` steps until the worst
   survivor count ``t <= s <= n`` meets ``rho`` with the exact ``tau`` of its components;
4. the XNoise plan (:mod:`secagg.dp.xnoise`, binary components) and the ring width ``b`` for
   the stated wrap probability (:mod:`secagg.dp.lanes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secagg.dp.accountant import ddg_rho, epsilon_pld, epsilon_rdp, rho_for_epsilon
from secagg.dp.encoding import rounded_norm_bound_sq
from secagg.dp.lanes import (
    DEFAULT_WRAP_PROBABILITY,
    lane_bits_for_dp,
    sum_variance_proxy,
    wrap_probability,
)
from secagg.dp.rotation import padded_dim
from secagg.dp.sampling import max_integer_variance
from secagg.dp.xnoise import DEFAULT_MAX_EXCESS, XNoisePlan, make_plan
from secagg.errors import ConfigurationError, InfeasibleParameters

__all__ = ["DEFAULT_BETA", "DEFAULT_ROUNDING_INFLATION", "DPCalibration", "calibrate", "round_rho"]

DEFAULT_BETA = math.exp(-0.5)
"""Conditional rounding's per-attempt failure bound (the value used in KLS21's experiments)."""

DEFAULT_ROUNDING_INFLATION = 0.02
"""``kappa``: rounding adds at most ~2% to the squared sensitivity."""


@dataclass(frozen=True)
class DPCalibration:
    """Everything a round needs to run the distributed discrete Gaussian, and what it costs."""

    epsilon: float
    delta: float
    rounds: int
    dim: int
    padded_dim: int
    clip: float
    gamma: float
    beta: float
    delta2_sq: int
    plan: XNoisePlan
    bits: int
    wrap_probability: float
    rho_per_round: float
    epsilon_rdp: float
    epsilon_pld: float
    sampling_rate: float

    @property
    def target_std(self) -> float:
        """Standard deviation of the released noise, per coordinate, in input units."""
        return math.sqrt(self.plan.target_variance) / self.gamma

    @property
    def rigorous(self) -> bool:
        """Whether ``epsilon_rdp`` is a proof (False when client sampling was assumed)."""
        return self.sampling_rate == 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary (the ``dp`` block of ``secagg simulate``)."""
        return {
            "mechanism": "distributed-discrete-gaussian+xnoise",
            "epsilon": self.epsilon_rdp,
            "epsilon_target": self.epsilon,
            "epsilon_pld": self.epsilon_pld,
            "delta": self.delta,
            "rounds": self.rounds,
            "rho_per_round": self.rho_per_round,
            "clip": self.clip,
            "gamma": self.gamma,
            "target_std": self.target_std,
            "target_variance_int": self.plan.target_variance,
            "delta2_sq": self.delta2_sq,
            "bits": self.bits,
            "wrap_probability_bound": self.wrap_probability,
            "components": self.plan.components,
            "noise_plan": self.plan.kind,
            "levels": list(self.plan.levels),
            "max_release_ratio": self.plan.max_release_ratio,
            "max_withholders": self.plan.max_withholders,
            "sampling_rate": self.sampling_rate,
            "rigorous": self.rigorous,
        }


def round_rho(plan: XNoisePlan, survivors: int, delta2_sq: int, dim: int) -> float:
    """``rho`` of a round with ``survivors`` contributors, counting only honest noise.

    The ``survivors - w`` honest survivors each leave the components ``plan.kept(s)`` (the
    bits of ``x(s)`` and the base) in the sum; ``tau`` is charged over that exact list.
    """
    cv = plan.component_variances
    honest = survivors - plan.max_withholders
    variances = sorted([cv[k] for k in plan.kept(survivors)] * honest)
    return ddg_rho(delta2_sq, variances, dim)


def _fit_plan(
    delta2_sq: int, rho: float, d: int, n: int, t: int, xi: float, w: int
) -> tuple[XNoisePlan, float]:
    """The least target variance (in 0.1% steps) whose worst survivor count meets ``rho``."""
    target = math.ceil(delta2_sq / (2.0 * rho))
    for _ in range(10_000):
        plan = make_plan(target, n, t, max_excess=xi, max_withholders=w)
        worst = max(round_rho(plan, s, delta2_sq, d) for s in range(t, n + 1))
        if worst <= rho:
            return plan, worst
        target = math.ceil(target * 1.001)
    raise InfeasibleParameters(  # pragma: no cover - tau is negligible for variances >= 4
        "no noise level meets rho (the tau term dominates)"
    )


def calibrate(
    epsilon: float,
    delta: float,
    rounds: int,
    *,
    n_clients: int,
    min_survivors: int,
    dim: int,
    clip: float,
    max_withholders: int = 0,
    max_excess: float = DEFAULT_MAX_EXCESS,
    beta: float = DEFAULT_BETA,
    rounding_inflation: float = DEFAULT_ROUNDING_INFLATION,
    wrap: float = DEFAULT_WRAP_PROBABILITY,
    sampling_rate: float = 1.0,
) -> DPCalibration:
    """Choose ``gamma``, the noise plan and ``b`` for the budget; see the module docstring.

    Raises
    ------
    InfeasibleParameters
        If the plan or the ring width cannot be met.
    """
    if not 0 < rounding_inflation < 1:
        raise ConfigurationError(f"rounding inflation must be in (0, 1), got {rounding_inflation}")
    rho = rho_for_epsilon(epsilon, delta, rounds, sampling_rate)
    d = padded_dim(dim)
    gamma = math.sqrt(d / (4.0 * rounding_inflation)) / clip
    # The largest component carries about T max(1 / (n - w), 1 / (t - w) - (1 - xi) / (n - w))
    # (the base b = R(n), or the top binary one, below R(t) - b + D); keep it within the exact
    # sampler's range (a smaller gamma costs privacy only through the rounding term).
    honest_n, honest_t = n_clients - max_withholders, min_survivors - max_withholders
    share = max(1.0 / honest_n, 1.0 / honest_t - (1.0 - max_excess) / honest_n)
    cap = max_integer_variance() / share * 2 * rho / 1.02
    while rounded_norm_bound_sq(clip, gamma, d, beta) > cap:
        gamma *= 0.9
    delta2_sq = rounded_norm_bound_sq(clip, gamma, d, beta)
    plan, worst = _fit_plan(
        delta2_sq, rho, d, n_clients, min_survivors, max_excess, max_withholders
    )
    released = max(plan.residual_variance(s) for s in range(min_survivors, n_clients + 1))
    proxy = sum_variance_proxy(clip=clip, gamma=gamma, dim=d, n=n_clients, noise_var=released)
    bits = lane_bits_for_dp(proxy=proxy, dim=d, n=n_clients, wrap=wrap)

    return DPCalibration(
        epsilon=epsilon,
        delta=delta,
        rounds=rounds,
        dim=dim,
        padded_dim=d,
        clip=clip,
        gamma=gamma,
        beta=beta,
        delta2_sq=delta2_sq,
        plan=plan,
        bits=bits,
        wrap_probability=wrap_probability(bits, proxy=proxy, dim=d, n=n_clients),
        rho_per_round=worst,
        epsilon_rdp=epsilon_rdp(worst, delta, rounds, sampling_rate),
        epsilon_pld=epsilon_pld(worst, delta, rounds, sampling_rate),
        sampling_rate=sampling_rate,
    )
