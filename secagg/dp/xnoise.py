"""Dropout-robust distributed noise: removable excess components (after Dordis's XNoise).

Dordis (Jiang et al., EuroSys 2024) has every client add more noise than it would need if
all stayed, as separately seeded components, and has the server subtract the components it no
longer needs once the survivors are known. This module is the sans-I/O arithmetic of that
scheme for discrete Gaussian noise with *integer* variances (so that everything is exact):

* survivor-count levels ``t = s_0 < s_1 < ... < s_L = n`` (:func:`make_plan`);
* per-client residual variance at level ``j``: ``R_j = ceil(T / (s_j - w))``, where ``T`` is
  the target variance of the released sum and ``w`` the number of survivors that may withhold
  their noise (the trust assumption, ``docs/dp.md``);
* client ``i`` adds components ``k = 0 .. L``, component ``k`` being ``N_Z(0, v_k)`` with
  ``v_k = R_k - R_(k+1)`` (``v_L = R_L``), drawn from the stream of its own seed
  ``seed_(i,k)``; the seeds of ``k < L`` are Shamir-shared with the masking seeds, the seed of
  the base component ``L`` is never shared;
* with ``s`` survivors, ``j = max{j : s_j <= s}``; every client reveals, for every survivor,
  its shares of the seeds of components ``k < j`` and no others; the server regenerates those
  components and subtracts them mod ``2^b``.

What is left is, for each survivor, ``sum_(k >= j) v_k = R_j``: the released sum carries
``s R_j`` in total and at least ``(s - w) R_j >= T`` from honest survivors, for every
``t <= s <= n``; :attr:`XNoisePlan.max_release_ratio` bounds the excess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secagg.dp.sampling import max_integer_variance
from secagg.dp.streams import discrete_gaussian_sum, discrete_gaussian_vector
from secagg.errors import ConfigurationError, InfeasibleParameters, ServerMisbehaviour
from secagg.prg import Purpose, derive_key

__all__ = [
    "DEFAULT_MAX_EXCESS",
    "MIN_COMPONENT_VARIANCE",
    "PRECOMPUTE_SALT_BYTES",
    "XNoisePlan",
    "check_plan",
    "client_noise",
    "component_key",
    "component_noise",
    "make_plan",
    "removal_noise",
    "revealed_components",
]

I64 = npt.NDArray[np.int64]

DEFAULT_MAX_EXCESS = 0.05
"""Default spacing of survivor levels: the released variance exceeds the target by at most
about 5% (exactly :attr:`XNoisePlan.max_release_ratio`)."""

MIN_COMPONENT_VARIANCE = 4
"""Smallest component variance: the sum-of-discrete-Gaussians term ``tau`` of the accountant
(KLS21, ``10 exp(-2 pi^2 a b / (a + b))`` per added component, ``a >= b >= 4``) stays below
``1e-16`` per component from here up, so its share ``tau d / 4`` of ``rho`` is below ``1e-7``
for 100 components of ``d = 2^20`` (it is always computed and charged, never assumed)."""


@dataclass(frozen=True)
class XNoisePlan:
    """The noise components of one round; every field is recomputed by each client.

    Attributes
    ----------
    target_variance:
        ``T``: the variance the released sum must carry from honest survivors (integer units).
    n_clients, min_survivors:
        ``n`` and ``t``: the round aborts with fewer than ``t`` survivors.
    max_withholders:
        ``w``: survivors that may add no noise (colluding with the server or faulty).
    max_excess:
        Level spacing ``xi``.
    levels:
        ``s_0 = t < ... < s_L = n``.
    residuals:
        ``R_j = ceil(T / (s_j - w))``, non-increasing.
    """

    target_variance: int
    n_clients: int
    min_survivors: int
    max_withholders: int
    max_excess: float
    levels: tuple[int, ...]
    residuals: tuple[int, ...]

    @property
    def components(self) -> int:
        """``L + 1``: noise vectors each client samples."""
        return len(self.levels)

    @property
    def component_variances(self) -> tuple[int, ...]:
        """``v_k = R_k - R_(k+1)`` and ``v_L = R_L``."""
        r = self.residuals
        return (*tuple(r[k] - r[k + 1] for k in range(len(r) - 1)), r[-1])

    def level(self, survivors: int) -> int:
        """``j = max{j : s_j <= survivors}`` for ``t <= survivors <= n``."""
        if not self.min_survivors <= survivors <= self.n_clients:
            raise ConfigurationError(
                f"{survivors} survivors outside [t={self.min_survivors}, n={self.n_clients}]"
            )
        return max(j for j, s in enumerate(self.levels) if s <= survivors)

    def residual_variance(self, survivors: int) -> int:
        """Total variance left in the released sum when every survivor added its noise."""
        return survivors * self.residuals[self.level(survivors)]

    def honest_variance(self, survivors: int) -> int:
        """Variance left from the ``survivors - w`` honest survivors: always ``>= T``."""
        return (survivors - self.max_withholders) * self.residuals[self.level(survivors)]

    @property
    def max_release_ratio(self) -> float:
        """``max_s (s R_j(s)) / T`` over ``t <= s <= n``: the bound on excess released noise."""
        worst = max(
            self.residual_variance(s) for s in range(self.min_survivors, self.n_clients + 1)
        )
        return worst / self.target_variance

    @property
    def max_total_variance(self) -> int:
        """Variance of the sum before any removal (``n`` clients, every component)."""
        return self.n_clients * self.residuals[0]


def _levels(t: int, n: int, xi: float) -> tuple[int, ...]:
    out = [t]
    while out[-1] < n:
        s = out[-1]
        out.append(min(n, max(s + 1, math.floor((1 + xi) * s) + 1)))
    return tuple(out)


def make_plan(
    target_variance: int,
    n_clients: int,
    min_survivors: int,
    *,
    max_excess: float = DEFAULT_MAX_EXCESS,
    max_withholders: int = 0,
) -> XNoisePlan:
    """The plan for target variance ``T``, ``n`` clients, threshold ``t`` and ``w`` withholders.

    Raises
    ------
    InfeasibleParameters
        If a component variance would fall below :data:`MIN_COMPONENT_VARIANCE` (raise the
        target, i.e. the scale ``gamma``, or ``max_excess``).
    """
    if not 1 <= min_survivors <= n_clients:
        raise ConfigurationError(f"need 1 <= t <= n, got t={min_survivors}, n={n_clients}")
    if not 0 <= max_withholders < min_survivors:
        raise ConfigurationError(f"need 0 <= w < t, got w={max_withholders}, t={min_survivors}")
    if not 0 < max_excess <= 1:
        raise ConfigurationError(f"max_excess must be in (0, 1], got {max_excess}")
    if target_variance < 1:
        raise ConfigurationError(
            f"target variance must be a positive integer, got {target_variance}"
        )
    levels = _levels(min_survivors, n_clients, max_excess)
    residuals = tuple(-(-target_variance // (s - max_withholders)) for s in levels)
    plan = XNoisePlan(
        target_variance, n_clients, min_survivors, max_withholders, max_excess, levels, residuals
    )
    small, big = min(plan.component_variances), max(plan.component_variances)
    if big > max_integer_variance():
        raise InfeasibleParameters(
            f"noise component variance {big} exceeds the exact sampler's "
            f"{max_integer_variance()}: lower the scale gamma"
        )
    if small < MIN_COMPONENT_VARIANCE:
        raise InfeasibleParameters(
            f"noise component variance {small} < {MIN_COMPONENT_VARIANCE}: target variance "
            f"{target_variance} too small for {len(levels)} levels between t={min_survivors} "
            f"and n={n_clients}"
        )
    return plan


def check_plan(plan: XNoisePlan, *, min_target_variance: int, max_withholders: int) -> None:
    """Client side: refuse a plan handed out by the server that is inconsistent or too weak.

    The client recomputes the plan from its headline numbers (so levels and residuals cannot
    be doctored) and compares the target and the tolerated withholders with its own policy.

    Raises
    ------
    ServerMisbehaviour
        If the plan does not match its own recomputation or is weaker than the policy.
    """
    try:
        again = make_plan(
            plan.target_variance,
            plan.n_clients,
            plan.min_survivors,
            max_excess=plan.max_excess,
            max_withholders=plan.max_withholders,
        )
    except (ConfigurationError, InfeasibleParameters) as exc:
        raise ServerMisbehaviour(f"server sent an invalid DP noise plan: {exc}") from exc
    if again != plan:
        raise ServerMisbehaviour("server's DP noise levels differ from their recomputation")
    if plan.target_variance < min_target_variance:
        raise ServerMisbehaviour(
            f"server asks for noise variance {plan.target_variance} < policy {min_target_variance}"
        )
    if plan.max_withholders < max_withholders:
        raise ServerMisbehaviour(
            f"server tolerates {plan.max_withholders} noise withholders < policy {max_withholders}"
        )


PRECOMPUTE_SALT_BYTES = 32
"""Length of the client-chosen salt of a precomputed (round-independent) noise key."""


def component_key(
    seed: bytes,
    session_id: bytes,
    client_id: int,
    component: int,
    *,
    precompute_salt: bytes | None = None,
) -> bytes:
    """Stream key of component ``k`` of client ``i``: HKDF(seed; session id; dp-noise, i, k).

    With ``precompute_salt`` (``PRECOMPUTE_SALT_BYTES`` from ``secrets``, chosen by the client
    with its fresh seeds *before* the round's session id exists), the key is
    ``HKDF(seed; salt; dp-noise, k)`` and ignores ``session_id`` and ``client_id``, so the
    client can draw its noise ahead of the round (while it trains or waits for ShareKeys).
    The salt is public: it travels with the client's shared seeds so that the server can
    regenerate removed components. Each (salt, seeds) set is for one round only; the security
    argument is in docs/dp.md ("Speed", drawing noise ahead of the round).
    """
    if precompute_salt is None:
        return derive_key(seed, session_id, Purpose.DP_NOISE, client_id, component)
    if len(precompute_salt) != PRECOMPUTE_SALT_BYTES:
        raise ConfigurationError(
            f"precompute salt is {len(precompute_salt)} bytes, need {PRECOMPUTE_SALT_BYTES}"
        )
    return derive_key(seed, precompute_salt, Purpose.DP_NOISE, component)


def component_noise(variance: int, key: bytes, dim: int, *, backend: str = "cpu") -> I64:
    """One component: ``dim`` exact draws of ``N_Z(0, variance)`` under ``key``.

    Coordinates come in chunks of 256, each chunk from its own stream
    (:mod:`secagg.dp.streams`: nonce ``DP_NOISE || LE88(chunk)``), by the parallel Numba
    kernel with exact fix-up, so the server regenerates a removed component bit for bit.
    """
    return discrete_gaussian_vector(key, variance, dim, backend=backend)


def client_noise(plan: XNoisePlan, keys: Sequence[bytes], dim: int, *, backend: str = "cpu") -> I64:
    """The total noise a client adds: the sum of its ``L + 1`` components (``keys[k]``).

    All components in one pass of the batched kernel (the same vector as summing
    :func:`component_noise` over ``k``).
    """
    if len(keys) != plan.components:
        raise ConfigurationError(f"need {plan.components} component keys, got {len(keys)}")
    return discrete_gaussian_sum(list(keys), plan.component_variances, dim, backend=backend)


def revealed_components(plan: XNoisePlan, survivors: Sequence[int], roster: Sequence[int]) -> range:
    """Client side: which component seeds (``k``) to reveal shares of, for every survivor.

    ``survivors`` is the (consistency-checked) survivor set the server announced; the client
    refuses one that is not a duplicate-free subset of the round's roster of size ``>= t``.
    """
    if len(set(survivors)) != len(survivors) or not set(survivors) <= set(roster):
        raise ServerMisbehaviour("survivor set has duplicates or ids outside the roster")
    if len(roster) != plan.n_clients:
        raise ServerMisbehaviour(f"roster of {len(roster)} != plan's n={plan.n_clients}")
    if len(survivors) < plan.min_survivors:
        raise ServerMisbehaviour(
            f"{len(survivors)} survivors < threshold {plan.min_survivors}: no noise removed"
        )
    return range(plan.level(len(survivors)))


def removal_noise(
    plan: XNoisePlan,
    removed_keys: Mapping[int, Sequence[bytes]],
    survivors: int,
    dim: int,
    *,
    backend: str = "cpu",
) -> I64:
    """Server side: the sum of the removable components of every survivor (to subtract).

    ``removed_keys[i]`` are the stream keys of survivor ``i``'s components ``0 .. j-1``,
    rebuilt from the revealed seed shares. All ``s j`` vectors go through one pass of the
    batched kernel (parallel over coordinate chunks, summed in place: no per-vector array).
    """
    j = plan.level(survivors)
    if len(removed_keys) != survivors:
        raise ConfigurationError(f"need removable keys of {survivors} survivors")
    variances = plan.component_variances
    flat: list[bytes] = []
    for cid, keys in removed_keys.items():
        if len(keys) != j:
            raise ConfigurationError(f"survivor {cid}: need {j} removable keys, got {len(keys)}")
        flat.extend(keys)
    return discrete_gaussian_sum(flat, [variances[k] for k in range(j)] * survivors, dim,
                                 backend=backend)  # fmt: skip
