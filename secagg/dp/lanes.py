"""Ring width for the noisy sum, with a stated bound on the probability of modular wrap-around.

Coordinate ``j`` of the released sum (before reduction mod ``2^b``) is

``S_j = sum_i r_ij + Z_j``,  ``r_i = round(gamma H D x_i / sqrt(d'))``,

where ``Z_j`` is the residual noise. Three facts bound it:

* rotation (Hoeffding over the shared random signs ``D``, independent of the inputs):
  ``gamma (H D sum_i x_i)_j / sqrt(d')`` is sub-Gaussian with variance proxy
  ``gamma^2 ||sum_i x_i||^2 / d' <= gamma^2 n^2 c^2 / d'`` (KLS21 section 4.1);
* rounding moves each client's coordinate by less than 1, so the sum by less than ``n``;
* ``N_Z(0, s^2)`` is ``s^2``-sub-Gaussian (Canonne, Kamath, Steinke 2020), and
  independent sub-Gaussians add their proxies: ``Z_j`` has proxy ``V_noise`` (the sum of the
  variances of every noise component left in the released sum).

So ``P(|S_j| >= n + u) <= 2 exp(-u^2 / (2 V))`` with ``V = gamma^2 n^2 c^2 / d' + V_noise``,
and by a union bound over the ``d'`` coordinates the centred decoding of the sum mod ``2^b``
is wrong anywhere with probability at most

``P_wrap <= 2 d' exp(-(2^(b-1) - n)^2 / (2 V))``.

Only the final released value matters: masks, excess noise and its removal are all
arithmetic mod ``2^b``, so intermediate values may wrap freely.
"""

from __future__ import annotations

import math

from secagg.errors import ConfigurationError, InfeasibleParameters

__all__ = ["DEFAULT_WRAP_PROBABILITY", "lane_bits_for_dp", "sum_variance_proxy", "wrap_probability"]

DEFAULT_WRAP_PROBABILITY = 2.0**-40
"""Default target for ``P_wrap`` per round (the 2^-40 statistical level used by fcp/secagg)."""


def sum_variance_proxy(*, clip: float, gamma: float, dim: int, n: int, noise_var: float) -> float:
    """``V = gamma^2 n^2 c^2 / d' + V_noise``: sub-Gaussian proxy of one coordinate of the sum."""
    if not (clip > 0 and gamma > 0 and dim > 0 and n > 0 and noise_var >= 0):
        raise ConfigurationError("variance proxy needs positive clip, gamma, dim, n")
    return (gamma * n * clip) ** 2 / dim + noise_var


def wrap_probability(bits: int, *, proxy: float, dim: int, n: int) -> float:
    """Upper bound on the chance that any coordinate of the sum wraps mod ``2^bits``."""
    u = 2.0 ** (bits - 1) - n
    if u <= 0:
        return 1.0
    return min(1.0, 2.0 * dim * math.exp(-(u * u) / (2.0 * proxy)))


def lane_bits_for_dp(
    *, proxy: float, dim: int, n: int, wrap: float = DEFAULT_WRAP_PROBABILITY, max_bits: int = 62
) -> int:
    """The least ``b`` with :func:`wrap_probability` ``<= wrap``.

    Raises
    ------
    InfeasibleParameters
        If even ``max_bits`` is not wide enough.
    """
    if not 0 < wrap < 1:
        raise ConfigurationError(f"wrap probability must be in (0, 1), got {wrap}")
    # 2^(b-1) >= n + sqrt(2 V ln(2 d' / wrap)) solved directly, then checked.
    need = n + math.sqrt(2.0 * proxy * math.log(2.0 * dim / wrap))
    bits = max(2, math.ceil(math.log2(need)) + 1)
    while bits > 2 and wrap_probability(bits - 1, proxy=proxy, dim=dim, n=n) <= wrap:
        bits -= 1
    while wrap_probability(bits, proxy=proxy, dim=dim, n=n) > wrap:
        bits += 1
    if bits > max_bits:
        raise InfeasibleParameters(
            f"noisy sum needs {bits} bits per coordinate for P_wrap <= {wrap:.3g} (max {max_bits})"
        )
    return bits
