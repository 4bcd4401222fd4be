"""Dropout-robust distributed noise: removable excess components (after Dordis's XNoise).

Dordis (Jiang et al., EuroSys 2024) has every client add more noise than it would need if
all stayed, as separately seeded components, and has the server subtract the components it no
longer needs once the survivors are known. This module is the sans-I/O arithmetic of that
scheme for discrete Gaussian noise with *integer* variances (so that everything is exact),
with the excess split in *binary* (subset-sum) components, so that a client adds
``O(log((n/t - 1) / xi))`` components instead of a ladder of ``O(log(n/t) / xi)``:

* per-survivor residual needed with ``s`` survivors: ``R(s) = ceil(T / (s - w))``, where ``T``
  is the target variance of the released sum and ``w`` the number of survivors that may
  withhold their noise (the trust assumption, ``docs/dp.md``);
* a base component of variance ``b = R(n)`` (never shared) and ``m`` removable components of
  variances ``2^i D``, ``i = 0 .. m-1``, with unit ``D = max(4, floor(xi R(n)))`` and ``m``
  the least with ``b + (2^m - 1) D >= R(t)`` (:func:`make_plan`);
* with ``s`` survivors a survivor keeps ``x(s) = ceil((R(s) - b) / D)`` units: components whose
  bit is set in ``x(s)``, plus the base; every client reveals, for every survivor, its shares
  of the seeds of the components whose bit is set in ``2^m - 1 - x(s)`` and no others; the
  server regenerates those components and subtracts them mod ``2^b``.

Where the geometric ladder of survivor levels has fewer components (small rounds, ``t`` close
to ``n``) the plan is that ladder instead: components ``R(s_j) - R(s_(j+1))`` removed as a
prefix (:attr:`XNoisePlan.ladder`).

What is left is, for each survivor, ``b + x(s) D`` in ``[R(s), R(s) + D)``: the released sum
carries ``s (b + x(s) D)`` in total and at least ``(s - w) R(s) >= T`` from honest survivors,
for every ``t <= s <= n``; :attr:`XNoisePlan.max_release_ratio` bounds the excess.
"""

from __future__ import annotations

import dataclasses
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
"""Default ``xi``: the unit of the removable components is ``xi R(n)``, so the released variance
exceeds the target by at most about 5% (exactly :attr:`XNoisePlan.max_release_ratio`)."""

MIN_COMPONENT_VARIANCE = 4
"""Smallest component variance: the sum-of-discrete-Gaussians term ``tau`` of the accountant
(KLS21, ``10 exp(-2 pi^2 a b / (a + b))`` per added component, ``a >= b >= 4``) stays below
``1e-16`` per component from here up, so its share ``tau d / 4`` of ``rho`` is below ``1e-7``
for 100 components of ``d = 2^20`` (it is always computed and charged, never assumed). It is
also the least unit ``D`` of the binary components."""


def _bits(value: int, width: int) -> tuple[int, ...]:
    return tuple(i for i in range(width) if value >> i & 1)


def _ladder_levels(t: int, n: int, xi: float) -> tuple[int, ...]:
    """``s_0 = t``, ``s_(j+1) = min(n, max(s_j + 1, floor((1 + xi) s_j) + 1))`` up to ``n``."""
    out = [t]
    while out[-1] < n:
        s = out[-1]
        out.append(min(n, max(s + 1, math.floor((1 + xi) * s) + 1)))
    return tuple(out)


@dataclass(frozen=True)
class XNoisePlan:
    """The noise components of one round; every field is recomputed by each client.

    Components ``0 .. m-1`` are removable, of variance ``2^i D``; component ``m`` (the last)
    is the base, of variance ``b``, whose seed is never shared.

    Attributes
    ----------
    target_variance:
        ``T``: the variance the released sum must carry from honest survivors (integer units).
    n_clients, min_survivors:
        ``n`` and ``t``: the round aborts with fewer than ``t`` survivors.
    max_withholders:
        ``w``: survivors that may add no noise (colluding with the server or faulty).
    max_excess:
        ``xi``: the unit is ``D = max(MIN_COMPONENT_VARIANCE, floor(xi R(n)))``.
    base_variance:
        ``b = R(n) = ceil(T / (n - w))``.
    unit_variance:
        ``D``.
    removable:
        ``m``: the least with ``b + (2^m - 1) D >= R(t)``.
    ladder:
        ``True`` when the geometric ladder of survivor levels (``s_0 = t``,
        ``s_(j+1) = max(s_j + 1, floor((1 + xi) s_j) + 1)``, up to ``n``) has fewer components
        than the binary plan (or as many and a lower release ratio): small rounds, or ``t``
        close to ``n``. Then ``m = L`` removable components ``R(s_j) - R(s_(j+1))``, removed
        as a prefix, and each survivor keeps ``R(s_j)`` for ``s_j <= s < s_(j+1)`` (``D`` is
        unused and kept as computed).
    """

    target_variance: int
    n_clients: int
    min_survivors: int
    max_withholders: int
    max_excess: float
    base_variance: int
    unit_variance: int
    removable: int
    ladder: bool = False

    @property
    def kind(self) -> str:
        """``"binary"`` or ``"ladder"`` (reported as ``noise_plan``)."""
        return "ladder" if self.ladder else "binary"

    def _check(self, survivors: int) -> None:
        if not self.min_survivors <= survivors <= self.n_clients:
            raise ConfigurationError(
                f"{survivors} survivors outside [t={self.min_survivors}, n={self.n_clients}]"
            )

    def needed(self, survivors: int) -> int:
        """``R(s) = ceil(T / (s - w))``: the per-survivor residual ``s`` survivors need."""
        self._check(survivors)
        return -(-self.target_variance // (survivors - self.max_withholders))

    def keep_units(self, survivors: int) -> int:
        """``x(s) = ceil((R(s) - b) / D)``, in ``[0, 2^m - 1]``: removable units kept
        (with :attr:`ladder`, the number of removable components kept, ``L - j``)."""
        if self.ladder:
            self._check(survivors)
            steps = _ladder_levels(self.min_survivors, self.n_clients, self.max_excess)
            return self.removable - max(j for j, s in enumerate(steps) if s <= survivors)
        return -(-(self.needed(survivors) - self.base_variance) // self.unit_variance)

    @property
    def components(self) -> int:
        """``m + 1``: noise vectors each client samples."""
        return self.removable + 1

    @property
    def component_variances(self) -> tuple[int, ...]:
        """``(D, 2 D, .., 2^(m-1) D, b)``: the removable components, then the base (with
        :attr:`ladder`: ``R(s_j) - R(s_(j+1))``, then the base)."""
        if self.ladder:
            steps = _ladder_levels(self.min_survivors, self.n_clients, self.max_excess)
            r = [self.needed(s) for s in steps]
            return (*(r[k] - r[k + 1] for k in range(self.removable)), self.base_variance)
        return (*(self.unit_variance << i for i in range(self.removable)), self.base_variance)

    def removed(self, survivors: int) -> tuple[int, ...]:
        """Components each survivor's seed holders reveal: the bits of ``2^m - 1 - x(s)``
        (with :attr:`ladder`: ``0 .. j - 1``)."""
        m = self.removable
        if self.ladder:
            return tuple(range(m - self.keep_units(survivors)))
        return _bits((1 << m) - 1 - self.keep_units(survivors), m)

    def kept(self, survivors: int) -> tuple[int, ...]:
        """Components left in the sum for each survivor: the bits of ``x(s)``, and the base
        (with :attr:`ladder`: ``j .. L``)."""
        m = self.removable
        if self.ladder:
            return tuple(range(m - self.keep_units(survivors), m + 1))
        return (*_bits(self.keep_units(survivors), m), m)

    def level(self, survivors: int) -> int:
        """How many components are removed per survivor (``len(removed(s))``)."""
        return len(self.removed(survivors))

    def residual(self, survivors: int) -> int:
        """``b + x(s) D``: the variance each survivor leaves in the sum, in ``[R(s), R(s) + D)``
        (with :attr:`ladder`: ``R(s_j)``, exactly ``R(s)`` where every count is a level)."""
        if self.ladder:
            kept = self.component_variances[self.removable - self.keep_units(survivors) :]
            return sum(kept)
        return self.base_variance + self.keep_units(survivors) * self.unit_variance

    def residual_variance(self, survivors: int) -> int:
        """Total variance left in the released sum when every survivor added its noise."""
        return survivors * self.residual(survivors)

    def honest_variance(self, survivors: int) -> int:
        """Variance left from the ``survivors - w`` honest survivors: always ``>= T``."""
        return (survivors - self.max_withholders) * self.residual(survivors)

    @property
    def levels(self) -> tuple[int, ...]:
        """Survivor counts ``t = s_0 < s_1 < ..`` at which the removed set changes."""
        t, n = self.min_survivors, self.n_clients
        return tuple(
            s for s in range(t, n + 1) if s == t or self.keep_units(s) != self.keep_units(s - 1)
        )

    @property
    def residuals(self) -> tuple[int, ...]:
        """The per-survivor residual ``b + x D`` at each of :attr:`levels` (non-increasing)."""
        return tuple(self.residual(s) for s in self.levels)

    @property
    def max_release_ratio(self) -> float:
        """``max_s s (b + x(s) D) / T`` over ``t <= s <= n``: the bound on excess noise."""
        worst = max(
            self.residual_variance(s) for s in range(self.min_survivors, self.n_clients + 1)
        )
        return worst / self.target_variance

    @property
    def max_total_variance(self) -> int:
        """Variance of the sum before any removal (``n`` clients, every component)."""
        return self.n_clients * sum(self.component_variances)


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
        If the base variance ``R(n)`` would fall below :data:`MIN_COMPONENT_VARIANCE` (raise
        the target, i.e. the scale ``gamma``), or a component would leave the exact sampler's
        range (lower ``gamma``).
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
    base = -(-target_variance // (n_clients - max_withholders))
    if base < MIN_COMPONENT_VARIANCE:
        raise InfeasibleParameters(
            f"noise component variance {base} < {MIN_COMPONENT_VARIANCE}: target variance "
            f"{target_variance} too small for n={n_clients} (w={max_withholders})"
        )
    unit = max(MIN_COMPONENT_VARIANCE, math.floor(max_excess * base))
    most = -(-target_variance // (min_survivors - max_withholders))
    # m = least with b + (2^m - 1) D >= R(t), i.e. 2^m > x(t) = ceil((R(t) - b) / D)
    removable = (-(-(most - base) // unit)).bit_length()
    plan = XNoisePlan(
        target_variance,
        n_clients,
        min_survivors,
        max_withholders,
        max_excess,
        base,
        unit,
        removable,
    )
    steps = _ladder_levels(min_survivors, n_clients, max_excess)
    if 1 < len(steps) <= plan.components:
        # the geometric ladder, where it is no longer (small rounds, or t close to n)
        lad = dataclasses.replace(plan, removable=len(steps) - 1, ladder=True)
        variances = lad.component_variances
        feasible = min(variances) >= MIN_COMPONENT_VARIANCE
        feasible = feasible and max(variances) <= max_integer_variance()
        if feasible and (lad.components, lad.max_release_ratio) < (
            plan.components,
            plan.max_release_ratio,
        ):
            plan = lad
    big = max(plan.component_variances)
    if big > max_integer_variance():
        raise InfeasibleParameters(
            f"noise component variance {big} exceeds the exact sampler's "
            f"{max_integer_variance()}: lower the scale gamma"
        )
    return plan


def check_plan(plan: XNoisePlan, *, min_target_variance: int, max_withholders: int) -> None:
    """Client side: refuse a plan handed out by the server that is inconsistent or too weak.

    The client recomputes the plan from its headline numbers (so base, unit and component
    count cannot be doctored) and compares the target and the tolerated withholders with its
    own policy.

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
    """The total noise a client adds: the sum of its ``m + 1`` components (``keys[k]``).

    All components in one pass of the batched kernel (the same vector as summing
    :func:`component_noise` over ``k``).
    """
    if len(keys) != plan.components:
        raise ConfigurationError(f"need {plan.components} component keys, got {len(keys)}")
    return discrete_gaussian_sum(list(keys), plan.component_variances, dim, backend=backend)


def revealed_components(
    plan: XNoisePlan, survivors: Sequence[int], roster: Sequence[int]
) -> tuple[int, ...]:
    """Client side: which component seeds (``k``) to reveal shares of, for every survivor.

    ``survivors`` is the (consistency-checked) survivor set the server announced; the client
    refuses one that is not a duplicate-free subset of the round's roster of size ``>= t``.
    The answer is :meth:`XNoisePlan.removed` of ``|U|``: the bits of ``2^m - 1 - x(|U|)``,
    never the base component ``m``.
    """
    if len(set(survivors)) != len(survivors) or not set(survivors) <= set(roster):
        raise ServerMisbehaviour("survivor set has duplicates or ids outside the roster")
    if len(roster) != plan.n_clients:
        raise ServerMisbehaviour(f"roster of {len(roster)} != plan's n={plan.n_clients}")
    if len(survivors) < plan.min_survivors:
        raise ServerMisbehaviour(
            f"{len(survivors)} survivors < threshold {plan.min_survivors}: no noise removed"
        )
    return plan.removed(len(survivors))


def removal_noise(
    plan: XNoisePlan,
    removed_keys: Mapping[int, Sequence[bytes]],
    survivors: int,
    dim: int,
    *,
    backend: str = "cpu",
) -> I64:
    """Server side: the sum of the removable components of every survivor (to subtract).

    ``removed_keys[i]`` are the stream keys of survivor ``i``'s components
    ``plan.removed(survivors)``, in that order, rebuilt from the revealed seed shares. All
    vectors go through one pass of the batched kernel (parallel over coordinate chunks,
    summed in place: no per-vector array).
    """
    removed = plan.removed(survivors)
    if len(removed_keys) != survivors:
        raise ConfigurationError(f"need removable keys of {survivors} survivors")
    variances = plan.component_variances
    flat: list[bytes] = []
    for cid, keys in removed_keys.items():
        if len(keys) != len(removed):
            raise ConfigurationError(
                f"survivor {cid}: need {len(removed)} removable keys, got {len(keys)}"
            )
        flat.extend(keys)
    return discrete_gaussian_sum(flat, [variances[k] for k in removed] * survivors, dim,
                                 backend=backend)  # fmt: skip
