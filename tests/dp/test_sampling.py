"""Exact samplers (secagg.dp.randomness, secagg.dp.sampling) against their exact distributions.

Statistical tests use fixed keys, so each is deterministic; the thresholds are set for a
false-alarm rate of 1e-4 per assertion had the keys been random (chi-square quantile
``chi2.ppf(1 - 1e-4, dof)``, two-sided normal quantile 3.89).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.dp import sampling
from secagg.dp.randomness import KeyStream
from secagg.dp.sampling import (
    bernoulli_exp,
    bernoulli_exp_int,
    discrete_gaussian,
    discrete_gaussian_pmf,
    discrete_laplace,
    max_integer_variance,
)
from secagg.errors import ConfigurationError
from secagg.prg import Purpose, keystream_u64

chi2 = pytest.importorskip("scipy.stats").chi2

ALPHA = 1e-4
Z = 3.89  # two-sided normal quantile at ALPHA


def _src(tag: int) -> KeyStream:
    return KeyStream(bytes([tag]) * 32, Purpose.DP_NOISE)


def _chi_square(samples: np.ndarray, pmf: dict[int, float]) -> tuple[float, float]:
    """Chi-square statistic over the values in ``pmf`` (expected count >= 5) plus one tail bin."""
    n = samples.size
    values, counts = np.unique(samples, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))
    stat, dof, tail_p, tail_o = 0.0, 0, 1.0, n
    for x, p in pmf.items():
        if n * p < 5:
            continue
        o = observed.get(x, 0)
        stat += (o - n * p) ** 2 / (n * p)
        dof += 1
        tail_p -= p
        tail_o -= o
    if n * tail_p >= 5:
        stat += (tail_o - n * tail_p) ** 2 / (n * tail_p)
        dof += 1
    return stat, float(chi2.ppf(1 - ALPHA, dof - 1))


def test_keystream_matches_prg_words() -> None:
    key = bytes(range(32))
    src = KeyStream(key, Purpose.DP_NOISE)
    got = np.concatenate([src.words(3), src.words(5)])
    assert (got == keystream_u64(key, Purpose.DP_NOISE, 8)).all()
    assert src.bytes_used == 64
    assert "used=64" in repr(src) and key.hex() not in repr(src)


def test_uniform_below_is_uniform() -> None:
    draws = _src(1).below_scalar(7, 70_000)
    stat, limit = _chi_square(draws.astype(np.int64), {k: 1 / 7 for k in range(7)})
    assert stat < limit


def test_uniform_below_huge_modulus_rejects_biased_words() -> None:
    # m = 2^63 - 1: threshold 2^64 mod m = 2, a word below it must be redrawn, not folded.
    m = (1 << 63) - 1
    draws = _src(2).below_scalar(m, 1000)
    assert int(draws.max()) < m


@given(st.lists(st.integers(1, (1 << 63) - 1), min_size=1, max_size=50))
def test_uniform_below_in_range(ms: list[int]) -> None:
    m = np.array(ms, dtype=np.uint64)
    assert (_src(3).below(m) < m).all()


@given(st.integers(1, 1 << 200))
def test_uniform_below_int_in_range(m: int) -> None:
    assert 0 <= _src(4).below_int(m) < m


@pytest.mark.parametrize("bad", [0, 1 << 63])
def test_uniform_below_refuses_bad_modulus(bad: int) -> None:
    with pytest.raises(ConfigurationError):
        _src(5).below(np.array([bad], dtype=np.uint64))


@pytest.mark.parametrize(("num", "den"), [(0, 1), (1, 3), (1, 1), (5, 2), (7, 1), (123, 100)])
def test_bernoulli_exp_frequency(num: int, den: int) -> None:
    n = 40_000
    hits = bernoulli_exp(_src(6), np.full(n, num, np.uint64), np.full(n, den, np.uint64))
    p = math.exp(-num / den)
    sd = math.sqrt(n * p * (1 - p)) or 1.0
    assert abs(int(hits.sum()) - n * p) <= Z * sd


def test_bernoulli_exp_int_frequency() -> None:
    src, n, p = _src(7), 4000, math.exp(-7 / 3)
    hits = sum(bernoulli_exp_int(src, 7, 3) for _ in range(n))
    assert abs(hits - n * p) <= Z * math.sqrt(n * p * (1 - p))


def test_discrete_laplace_matches_pmf() -> None:
    t = 3
    x = discrete_laplace(_src(8), t, 60_000)
    norm = (1 - math.exp(-1 / t)) / (1 + math.exp(-1 / t))
    pmf = {k: norm * math.exp(-abs(k) / t) for k in range(-60, 61)}
    stat, limit = _chi_square(x, pmf)
    assert stat < limit


@pytest.mark.parametrize("sigma2", [Fraction(1, 4), 1, 2, Fraction(25, 4), 100, 1000])
def test_discrete_gaussian_matches_pmf(sigma2: Fraction | int) -> None:
    x = discrete_gaussian(_src(9), sigma2, 60_000)
    support = int(12 * math.sqrt(float(sigma2))) + 2
    probs = discrete_gaussian_pmf(sigma2, support)
    pmf = {k - support: float(p) for k, p in enumerate(probs)}
    stat, limit = _chi_square(x, pmf)
    assert stat < limit


@pytest.mark.parametrize("sigma2", [10**4, 10**6, 3 * 10**8])
def test_discrete_gaussian_moments(sigma2: int) -> None:
    """Large variances: mean and variance within Z standard errors (variance ~ sigma^2 there)."""
    n = 100_000
    x = discrete_gaussian(_src(10), sigma2, n).astype(np.float64)
    assert abs(x.mean()) <= Z * math.sqrt(sigma2 / n)
    # Var of the sample variance of a near-Gaussian: 2 sigma^4 / n.
    assert abs(x.var() - sigma2) <= Z * sigma2 * math.sqrt(2 / n)
    # Fourth moment of a Gaussian: 3 sigma^4 (kurtosis check against a Laplace-like bug).
    kurt = float((x**4).mean() / x.var() ** 2)
    assert abs(kurt - 3.0) < 0.1


def test_exact_slow_path_has_the_same_law(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate through the Python-integer tail path: still N_Z(0, sigma^2) exactly."""
    monkeypatch.setattr(sampling, "_MAX_X", 0)
    x = discrete_gaussian(_src(11), 9, 6000)
    probs = discrete_gaussian_pmf(9, 40)
    stat, limit = _chi_square(x, {k - 40: float(p) for k, p in enumerate(probs)})
    assert stat < limit


def test_samples_are_a_function_of_the_key() -> None:
    a = discrete_gaussian(_src(12), 50, 5000)
    b = discrete_gaussian(_src(12), 50, 5000)
    c = discrete_gaussian(_src(13), 50, 5000)
    assert (a == b).all() and not (a == c).all()
    assert a.dtype == np.int64 and a.size == 5000


def test_refuses_variance_beyond_exact_range() -> None:
    discrete_gaussian(_src(14), max_integer_variance(), 10)
    with pytest.raises(ConfigurationError, match="too large"):
        discrete_gaussian(_src(14), max_integer_variance() + 1, 10)
    with pytest.raises(ConfigurationError):
        discrete_gaussian(_src(14), 0, 10)
    with pytest.raises(ConfigurationError):
        discrete_laplace(_src(14), 0, 10)


def test_tiny_rational_variance_does_not_overflow() -> None:
    """sigma^2 = 1/2^40: t q = 2^40, so |y| t q overflows int64 for |y| >= 2^23 if computed
    blindly; the sampler must still return (almost surely) zeros, exactly."""
    x = discrete_gaussian(_src(15), Fraction(1, 1 << 40), 2000)
    assert (x == 0).all()
