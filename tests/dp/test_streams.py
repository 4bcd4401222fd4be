"""Per-sample noise streams: the Numba kernel against the exact scalar reference, bit for bit.

Statistical checks use fixed keys; thresholds at false-alarm rate 1e-4 (as test_sampling).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg.dp import streams
from secagg.dp.sampling import discrete_gaussian_pmf, max_integer_variance
from secagg.dp.streams import dg_sample_reference, discrete_gaussian_vector, sample_nonce
from secagg.errors import ConfigurationError
from secagg.kernels import dp_noise
from secagg.prg import Purpose, keystream_u64, nonce_for

chi2 = pytest.importorskip("scipy.stats").chi2

KEY = bytes(range(32))


def test_nonce_layout() -> None:
    assert sample_nonce(0) == nonce_for(Purpose.DP_NOISE)
    assert sample_nonce(1) == bytes([16, 1]) + bytes(10)
    assert sample_nonce(2**64 - 1) == bytes([16]) + b"\xff" * 8 + bytes(3)
    with pytest.raises(ConfigurationError):
        sample_nonce(2**64)
    # Sample 0's words are the plain DP_NOISE keystream (first word = its first draw).
    w = streams._Words(KEY, 0)
    assert w.next() == int(keystream_u64(KEY, Purpose.DP_NOISE, 1)[0])


@pytest.mark.parametrize("sigma2", [1, 2, 7, 100, 10**6, max_integer_variance()])
def test_kernel_matches_reference_bit_for_bit(sigma2: int) -> None:
    got = discrete_gaussian_vector(KEY, sigma2, 1500)
    want = [dg_sample_reference(KEY, i, sigma2) for i in range(1500)]
    assert got.tolist() == want


def test_flagged_samples_are_recomputed_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel with ``amax = 0`` flags every nonzero candidate; the fix-up restores them."""
    real = dp_noise.discrete_gaussian

    def all_flagged(key: bytes, tag: int, sigma2: int, count: int):  # type: ignore[no-untyped-def]
        out, _ = real(key, tag, sigma2, count)
        return np.zeros_like(out), np.arange(count)

    monkeypatch.setattr(dp_noise, "discrete_gaussian", all_flagged)
    got = discrete_gaussian_vector(KEY, 50, 300)
    assert got.tolist() == [dg_sample_reference(KEY, i, 50) for i in range(300)]
    # And the kernel really flags when told the products could overflow.
    out = np.zeros(200, dtype=np.int64)
    flags = np.zeros(200, dtype=np.bool_)
    t = math.isqrt(50) + 1
    dp_noise._dg_kernel(dp_noise.key_words(KEY), 16, 50, 1, t, 2 * 50 * t * t, 0, out, flags)
    assert flags.mean() > 0.5


def test_samples_do_not_depend_on_count_or_order() -> None:
    a = discrete_gaussian_vector(KEY, 1000, 5000)
    b = discrete_gaussian_vector(KEY, 1000, 37)
    assert (a[:37] == b).all()
    assert not (a == discrete_gaussian_vector(bytes(32), 1000, 5000)).all()


@pytest.mark.parametrize("sigma2", [1, 9, 400])
def test_kernel_output_matches_pmf(sigma2: int) -> None:
    x = discrete_gaussian_vector(KEY, sigma2, 60_000)
    support = int(12 * math.sqrt(sigma2)) + 2
    probs = discrete_gaussian_pmf(sigma2, support)
    values, counts = np.unique(x, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))
    stat, dof, rest_p, rest_o = 0.0, 0, 1.0, x.size
    for k, p in enumerate(probs):
        e = x.size * float(p)
        if e < 5:
            continue
        o = observed.get(k - support, 0)
        stat += (o - e) ** 2 / e
        dof += 1
        rest_p -= float(p)
        rest_o -= o
    if x.size * rest_p >= 5:
        stat += (rest_o - x.size * rest_p) ** 2 / (x.size * rest_p)
        dof += 1
    assert stat < chi2.ppf(1 - 1e-4, dof - 1)


def test_large_variance_moments() -> None:
    n, s2 = 200_000, 3 * 10**8
    x = discrete_gaussian_vector(KEY, s2, n).astype(np.float64)
    assert abs(x.mean()) <= 3.89 * math.sqrt(s2 / n)
    assert abs(x.var() / s2 - 1) <= 3.89 * math.sqrt(2 / n)


def test_refuses_out_of_range() -> None:
    with pytest.raises(ConfigurationError):
        discrete_gaussian_vector(KEY, 0, 10)
    with pytest.raises(ConfigurationError):
        discrete_gaussian_vector(KEY, max_integer_variance() + 1, 10)
    with pytest.raises(ConfigurationError):
        discrete_gaussian_vector(b"short", 10, 10)
