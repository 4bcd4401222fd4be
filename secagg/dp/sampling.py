"""Exact discrete Laplace and discrete Gaussian samplers (Canonne, Kamath, Steinke 2020).

Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS 2020),
Algorithms 1-3: Bernoulli(exp(-gamma)) for rational gamma, the discrete Laplace by rejection
from a geometric, and the discrete Gaussian ``N_Z(0, sigma^2)`` by rejection from a discrete
Laplace of scale ``t = floor(sigma) + 1``. Every comparison is between integers, every coin
is an exactly uniform integer from a :class:`~secagg.dp.randomness.KeyStream`: no
floating-point number is ever drawn or rounded, so the output distribution is exactly the
stated one (up to the pseudorandomness of ChaCha20).

The algorithms run vectorised over numpy ``uint64`` arrays. Elements whose exact integers
would not fit in 64 bits (a Laplace candidate beyond about ``16 sigma``, probability below
``e^-16`` each) take an exact Python-integer path, so exactness never depends on a bound.
Coins are consumed in a fixed order that depends only on the key, the parameters and the
count, so a noise vector is a deterministic function of its key.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from secagg.dp.randomness import U64, KeyStream
from secagg.errors import ConfigurationError

__all__ = [
    "MAX_DG_DENOMINATOR",
    "bernoulli_exp",
    "bernoulli_exp_int",
    "discrete_gaussian",
    "discrete_gaussian_pmf",
    "discrete_laplace",
    "max_integer_variance",
]

I64 = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MAX_DG_DENOMINATOR = 1 << 58
"""Vector path bound on ``2 p q t^2`` (``sigma^2 = p/q``): with ``K < 32`` series terms every
product ``den * K`` of Algorithm 1 stays below 2^63. About ``sigma < 19,500`` for integer
``sigma^2``; larger variances are refused (split them into several components)."""

_MAX_X = 1 << 32
"""``|X| < 2^32`` keeps ``X^2`` inside a ``uint64`` on the vector path."""


def max_integer_variance() -> int:
    """The largest integer ``sigma^2`` the vector sampler takes (``2 sigma^2 t^2 < 2^58``)."""
    lo, hi = 1, 1 << 30
    while lo < hi:
        mid = (lo + hi + 1) // 2
        t = math.isqrt(mid) + 1
        if 2 * mid * t * t < MAX_DG_DENOMINATOR:
            lo = mid
        else:
            hi = mid - 1
    return lo


def bernoulli_exp_int(src: KeyStream, num: int, den: int) -> bool:
    """One exact Bernoulli(exp(-num/den)) draw with Python integers (CKS20 Algorithm 1)."""
    if num < 0 or den < 1:
        raise ConfigurationError("Bernoulli(exp(-gamma)) needs gamma = num/den >= 0")
    whole, frac = divmod(num, den)
    for _ in range(whole):
        if not _series_int(src, 1, 1, 1):
            return False
    return frac == 0 or _series_int(src, frac, den, 1)


def _series_int(src: KeyStream, a: int, b: int, k: int) -> bool:
    """Bernoulli(exp(-a/b)) for ``0 <= a <= b``, continuing the series loop at term ``k``."""
    while src.below_int(b * k) < a:
        k += 1
    return k % 2 == 1


def _series(src: KeyStream, a: U64, b: U64) -> BoolArray:
    """Vectorised Bernoulli(exp(-a_i/b_i)) for ``0 <= a_i <= b_i < 2^58`` (CKS20 Algorithm 1).

    ``K = 1``; repeat: draw ``A ~ Bernoulli(gamma / K)``; stop when ``A = 0``, else ``K += 1``;
    return ``K`` odd.
    """
    n = a.size
    out = np.zeros(n, dtype=np.bool_)
    # Where gamma = 1 the first draw, Bernoulli(gamma / 1), is certain: start at K = 2.
    k = np.where(a == b, np.uint64(2), np.uint64(1))
    todo = np.arange(n)
    limit = np.uint64((1 << 63) - 1)
    while todo.size:
        bt = b[todo]
        kt = k[todo]
        wide = kt > limit // bt
        if wide.any():  # K past ~32 terms: finish those exactly with Python integers
            for j in todo[wide]:
                out[j] = _series_int(src, int(a[j]), int(b[j]), int(k[j]))
            todo, bt, kt = todo[~wide], bt[~wide], kt[~wide]
        hit = src.below(bt * kt) < a[todo]
        stop = todo[~hit]
        out[stop] = (k[stop] % np.uint64(2)) == 1
        todo = todo[hit]
        k[todo] += np.uint64(1)
    return out


def bernoulli_exp(src: KeyStream, num: U64, den: U64) -> BoolArray:
    """Vectorised exact Bernoulli(exp(-num_i/den_i)), ``1 <= den_i < 2^58`` (CKS20 Algorithm 1).

    ``gamma > 1`` is ``floor(gamma)`` independent Bernoulli(exp(-1)) draws that must all
    succeed, then one Bernoulli(exp(-(gamma - floor(gamma)))).
    """
    num = np.asarray(num, dtype=np.uint64)
    den = np.asarray(den, dtype=np.uint64)
    whole = num // den
    frac = num - whole * den
    alive = np.ones(num.size, dtype=np.bool_)
    idx = np.flatnonzero(whole > 0)
    rem = whole[idx]
    while idx.size:
        ok = _series(src, np.ones(idx.size, np.uint64), np.ones(idx.size, np.uint64))
        alive[idx[~ok]] = False
        rem = rem - np.uint64(1)
        keep = ok & (rem > 0)
        idx, rem = idx[keep], rem[keep]
    idx = np.flatnonzero(alive & (frac > 0))
    alive[idx] = _series(src, frac[idx], den[idx])
    return alive


def _geometric_exp1(src: KeyStream, n: int) -> U64:
    """``n`` draws of the number of successes before the first failure of Bernoulli(exp(-1))."""
    v = np.zeros(n, dtype=np.uint64)
    idx = np.arange(n)
    one = np.ones(n, dtype=np.uint64)
    while idx.size:
        ok = _series(src, one[: idx.size], one[: idx.size])
        idx = idx[ok]
        v[idx] += np.uint64(1)
    return v


def _bits(src: KeyStream, n: int) -> BoolArray:
    """``n`` fair coins: bit ``j % 64`` of word ``j // 64``."""
    words = src.words((n + 63) // 64).astype("<u8")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(np.bool_)


def discrete_laplace(src: KeyStream, t: int, count: int) -> I64:
    """``count`` exact draws of the discrete Laplace ``P(x) ∝ exp(-|x|/t)`` (CKS20 Algorithm 2).

    Parameters
    ----------
    src:
        Coin source.
    t:
        Integer scale ``1 <= t < 2^40``.
    count:
        Number of samples.
    """
    if not 1 <= t < 1 << 40:
        raise ConfigurationError(f"discrete Laplace scale must be in [1, 2^40), got {t}")
    parts: list[I64] = []
    need = count
    tt = np.uint64(t)
    while need > 0:
        m = need + need // 2 + 16
        u = src.below_scalar(t, m)
        u = u[bernoulli_exp(src, u, np.full(m, t, dtype=np.uint64))]
        x = u + tt * _geometric_exp1(src, u.size)
        neg = _bits(src, u.size)
        keep = ~(neg & (x == 0))
        y = x[keep].astype(np.int64)
        y[neg[keep]] *= -1
        parts.append(y[:need])
        need -= parts[-1].size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _as_fraction(sigma2: Fraction | int) -> Fraction:
    s = Fraction(sigma2)
    if s <= 0:
        raise ConfigurationError(f"discrete Gaussian variance must be positive, got {s}")
    return s


def discrete_gaussian(src: KeyStream, sigma2: Fraction | int, count: int) -> I64:
    """``count`` exact draws of ``N_Z(0, sigma2)``, ``P(x) ∝ exp(-x^2 / (2 sigma2))`` (CKS20 Alg 3).

    Parameters
    ----------
    src:
        Coin source.
    sigma2:
        The variance parameter ``sigma^2 = p/q`` as an exact rational; ``2 p q t^2`` must be
        below :data:`MAX_DG_DENOMINATOR` with ``t = floor(sigma) + 1``.
    count:
        Number of samples.

    Notes
    -----
    Candidate ``Y ~ Lap_Z(t)`` is accepted with probability
    ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)) = exp(-(|Y| t q - p)^2 / (2 p q t^2))``.
    ``sigma2`` is the parameter of the distribution; its variance is slightly below it
    (CKS20) and equal to it within ``1e-14`` relative for ``sigma2 >= 2`` (``2e-7`` at 1,
    14% at 1/4; computed with mpmath).
    """
    s = _as_fraction(sigma2)
    p, q = s.numerator, s.denominator
    t = math.isqrt(p // q) + 1
    den = 2 * p * q * t * t
    if den >= MAX_DG_DENOMINATOR:
        raise ConfigurationError(
            f"sigma^2 = {s} too large for the exact vector sampler (2pqt^2 = {den} >= 2^58)"
        )
    tq = t * q
    parts: list[I64] = []
    need = count
    while need > 0:
        m = need + need // 2 + 16
        y = discrete_laplace(src, t, m)
        a = np.abs(y)
        # |y| t q - p in int64 only where it cannot overflow, then |X| < 2^32 so X^2 < 2^64.
        safe = a <= ((1 << 62) - p) // tq
        x = np.where(safe, a, 0) * tq - p
        fast = safe & (np.abs(x) < _MAX_X)
        accept = np.zeros(m, dtype=np.bool_)
        fi = np.flatnonzero(fast)
        xf = np.abs(x[fi]).astype(np.uint64)
        accept[fi] = bernoulli_exp(src, xf * xf, np.full(fi.size, den, dtype=np.uint64))
        for j in np.flatnonzero(~fast):  # far tail: exact Python integers
            xj = abs(int(y[j])) * tq - p
            accept[j] = bernoulli_exp_int(src, xj * xj, den)
        parts.append(y[accept][:need])
        need -= parts[-1].size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def discrete_gaussian_pmf(sigma2: Fraction | int, support: int) -> npt.NDArray[np.float64]:
    """``P(x)`` of ``N_Z(0, sigma2)`` for ``x = -support .. support`` (float64, for tests).

    Normalised over a window of ``+-max(support, 40 sigma)``, which holds all but
    ``< e^-800`` of the mass.
    """
    s = float(_as_fraction(sigma2))
    half = max(support, int(40 * math.sqrt(s)) + 1)
    xs = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-(xs * xs) / (2.0 * s))
    w /= w.sum()
    mid = half
    return w[mid - support : mid + support + 1]
