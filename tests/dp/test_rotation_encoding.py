"""Rotation, clipping, conditional rounding, modular clipping and the wrap-around bound."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.dp.encoding import (
    centre,
    clip_l2,
    conditional_round,
    decode_sum,
    encode_update,
    rounded_norm_bound_sq,
    to_ring,
)
from secagg.dp.lanes import lane_bits_for_dp, sum_variance_proxy, wrap_probability
from secagg.dp.randomness import KeyStream
from secagg.dp.rotation import fwht, padded_dim, rotate, sign_vector, unrotate
from secagg.dp.sampling import discrete_gaussian
from secagg.errors import ConfigurationError, InfeasibleParameters, InputError
from secagg.prg import Purpose

KEY = bytes(range(32))
Z = 3.89  # two-sided normal quantile at false-alarm rate 1e-4


@given(st.integers(0, 10), st.data())
def test_fwht_is_exact_on_integers(log_n: int, data: st.DataObject) -> None:
    n = 1 << log_n
    v = np.array(data.draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n)))
    assert (fwht(fwht(v.astype(np.int64))) == n * v).all()


def test_fwht_known_answer() -> None:
    assert fwht(np.array([1, 0, 0, 0])).tolist() == [1, 1, 1, 1]
    assert fwht(np.array([1, 2, 3, 4])).tolist() == [10, -2, -4, 0]
    with pytest.raises(ConfigurationError):
        fwht(np.zeros(3))


@given(st.integers(1, 3000))
def test_rotation_round_trip(dim: int) -> None:
    x = np.random.default_rng(dim).normal(size=dim)  # test data only, not secret
    y = rotate(x, KEY)
    assert y.size == padded_dim(dim)
    assert math.isclose(np.linalg.norm(y), np.linalg.norm(x), rel_tol=1e-12)
    assert np.abs(unrotate(y, KEY, dim) - x).max() <= 1e-12 * max(1.0, np.abs(x).max())


def test_rotation_flattens_a_spike() -> None:
    x = np.zeros(4096)
    x[7] = 1.0
    assert np.allclose(np.abs(rotate(x, KEY)), 1 / 64)


def test_sign_vector_is_keyed_and_balanced() -> None:
    s = sign_vector(KEY, 1 << 16)
    assert set(np.unique(s).tolist()) == {-1.0, 1.0}
    assert abs(s.sum()) <= Z * 256  # sum of 2^16 fair signs: sd 256
    assert not (s == sign_vector(bytes(32), 1 << 16)).all()
    assert (s == sign_vector(KEY, 1 << 16)).all()


def test_clip_l2() -> None:
    x = np.array([3.0, 4.0])
    assert np.allclose(clip_l2(x, 1.0), [0.6, 0.8])
    assert np.array_equal(clip_l2(x, 10.0), x)
    with pytest.raises(InputError):
        clip_l2(np.array([1.0, math.nan]), 1.0)
    with pytest.raises(ConfigurationError):
        clip_l2(x, 0.0)


def test_conditional_rounding_respects_bound_and_is_unbiased() -> None:
    rng = np.random.default_rng(5)  # test data only
    z = rng.normal(size=256) * 3
    bound = rounded_norm_bound_sq(float(np.linalg.norm(z)), 1.0, 256, 0.5)
    src = KeyStream(KEY, Purpose.DP_ROUNDING)
    rs = np.array([conditional_round(z, bound, src) for _ in range(400)])
    assert ((rs * rs).sum(axis=1) <= bound).all()
    assert (np.abs(rs - z) < 1).all()
    # Mean over 400 draws: each coordinate's rounding has sd <= 1/2, so sd of mean <= 1/40;
    # conditioning shifts it by O(beta) at most, well inside the tolerance.
    assert np.abs(rs.mean(axis=0) - z).max() < 0.2


def test_conditional_rounding_gives_up_on_impossible_bound() -> None:
    with pytest.raises(InputError, match="conditional rounding"):
        conditional_round(np.full(16, 0.5), 0, KeyStream(KEY, Purpose.DP_ROUNDING))


def test_rounded_norm_bound_known_answer() -> None:
    # c g = 10, d = 64, beta = e^-2: min(100 + 16 + 2 * (10 + 4), (10 + 8)^2) = 144.
    assert rounded_norm_bound_sq(1.0, 10.0, 64, math.exp(-2)) == 144
    with pytest.raises(ConfigurationError):
        rounded_norm_bound_sq(1.0, 10.0, 64, 1.0)


@given(st.lists(st.integers(-(2**19), 2**19 - 1), min_size=1, max_size=64))
def test_ring_round_trip(values: list[int]) -> None:
    v = np.array(values, dtype=np.int64)
    assert (centre(to_ring(v, 20), 20) == v).all()
    assert (centre(to_ring(v, 64), 64) == v).all()


def test_encode_sum_decode() -> None:
    """Sum of encoded updates mod 2^b decodes to the sum of clipped inputs (no noise)."""
    rng = np.random.default_rng(9)  # test data only
    dim, n, gamma, bits = 300, 5, 500.0, 24
    xs = [rng.normal(size=dim) for _ in range(n)]
    total = np.zeros(padded_dim(dim), dtype=np.uint64)
    for i, x in enumerate(xs):
        r = encode_update(
            x,
            clip=2.0,
            gamma=gamma,
            beta=0.5,
            rotation_key=KEY,
            rounding=KeyStream(bytes([i]) * 32, Purpose.DP_ROUNDING),
        )
        total += to_ring(r, bits)
    got = decode_sum(total, bits=bits, gamma=gamma, rotation_key=KEY, dim=dim)
    want = sum(clip_l2(x, 2.0) for x in xs)
    # Rounding moves each rotated coordinate by < 1 per client: L2 error < n sqrt(d') / gamma.
    assert np.linalg.norm(got - want) < n * math.sqrt(512) / gamma


def test_wrap_bound_monotone_and_bits_minimal() -> None:
    proxy = sum_variance_proxy(clip=1.0, gamma=3600.0, dim=2**20, n=100, noise_var=3.1e9)
    b = lane_bits_for_dp(proxy=proxy, dim=2**20, n=100)
    assert wrap_probability(b, proxy=proxy, dim=2**20, n=100) <= 2.0**-40
    assert wrap_probability(b - 1, proxy=proxy, dim=2**20, n=100) > 2.0**-40
    ps = [wrap_probability(k, proxy=proxy, dim=2**20, n=100) for k in range(10, 30)]
    assert all(a >= b for a, b in itertools.pairwise(ps))
    with pytest.raises(InfeasibleParameters):
        lane_bits_for_dp(proxy=1e40, dim=2**20, n=100)


def test_wrap_bound_holds_empirically() -> None:
    """Sums of rotated, rounded, noised vectors: measured wrap frequency <= the stated bound.

    At the chosen width no trial wraps; one and two bits narrower the bound is loose enough
    to be >= the frequency observed (it is an upper bound, so this is the check that matters).
    """
    rng = np.random.default_rng(17)  # test data only
    dim, n, gamma, clip, noise_var, trials = 256, 8, 40.0, 1.0, 400, 60
    d = padded_dim(dim)
    proxy = sum_variance_proxy(clip=clip, gamma=gamma, dim=d, n=n, noise_var=noise_var)
    chosen = lane_bits_for_dp(proxy=proxy, dim=d, n=n, wrap=1e-3)
    sums = []
    for trial in range(trials):
        key = bytes([trial]) * 32
        s = np.zeros(d, dtype=np.int64)
        for i in range(n):
            x = rng.normal(size=dim)
            src = KeyStream(bytes([i, trial]) + bytes(30), Purpose.DP_ROUNDING)
            s += encode_update(x, clip=clip, gamma=gamma, beta=0.5, rotation_key=key, rounding=src)
        s += discrete_gaussian(KeyStream(key, Purpose.DP_NOISE), noise_var, d)
        sums.append(s)
    for bits in (chosen, chosen - 1, chosen - 2):
        wrapped = sum(bool((centre(to_ring(s, bits), bits) != s).any()) for s in sums)
        bound = wrap_probability(bits, proxy=proxy, dim=d, n=n)
        assert wrapped / trials <= bound + Z * math.sqrt(max(bound, 1e-9) / trials)
    assert all((centre(to_ring(s, chosen), chosen) == s).all() for s in sums)


def test_attack_norm_check_cannot_overflow() -> None:
    """Attack: coordinates near 2^32 make an int64 ``r . r`` wrap to a small number, so an
    over-norm vector would pass the sensitivity check. The exact fallback refuses it (an
    int64 dot product accepted it before the fix)."""
    z = np.full(4, float(2**32))
    with pytest.raises(InputError, match="conditional rounding"):
        conditional_round(z, 1000, KeyStream(KEY, Purpose.DP_ROUNDING))


@pytest.mark.parametrize("log_n", [0, 1, 2, 5, 11, 12, 13, 14, 17])
def test_numba_fwht_is_bit_identical_to_the_numpy_reference(log_n: int) -> None:
    """The parallel in-place kernel (blocked stages, then radix-4 passes) against the
    stage-by-stage numpy reference: float64 bit for bit, int64 exactly, on both sides of the
    block size 2^11 and an odd number of stages past it."""
    from secagg.dp.rotation import fwht_inplace, fwht_reference

    rng = np.random.default_rng(log_n)  # test data only
    n = 1 << log_n
    v = rng.normal(0, 1, n)
    assert np.array_equal(fwht(v), fwht_reference(v))
    iv = rng.integers(-(10**6), 10**6, n)
    w = iv.copy()
    assert fwht_inplace(w) is w and np.array_equal(w, fwht_reference(iv))
    small = np.arange(n, dtype=np.int32) % 7  # other dtypes: the reference path
    assert np.array_equal(fwht(small), fwht_reference(small.astype(np.int64)))


def test_rotation_known_answer_is_unchanged_by_the_kernel() -> None:
    """Rotation KAT: the first outputs for a fixed key and input (pinned to the numpy
    pipeline's values before the Numba FWHT)."""
    from secagg.dp.rotation import fwht_reference

    x = np.arange(1.0, 11.0)
    n = padded_dim(10)
    padded = np.zeros(n)
    padded[:10] = x
    want = fwht_reference(padded * sign_vector(KEY, n)) / np.sqrt(n)
    assert np.array_equal(rotate(x, KEY), want)


@pytest.mark.parametrize("size", [1, 100, 4097])
def test_fused_rounding_kernel_is_bit_identical_to_the_numpy_reference(size: int) -> None:
    """Same coins, same rounded vector: the fused Numba pass against the numpy formulation
    (also for values at integers, negative values and near 2^51)."""
    from secagg.dp.reference import ReferenceKeyStream
    from secagg.dp.reference import conditional_round as conditional_round_reference

    rng = np.random.default_rng(size)  # test data only
    z = rng.normal(0, 50, size)
    z[: min(size, 3)] = [-3.0, 2.0**51 + 0.5, -0.25][: min(size, 3)]
    big = 10**40
    got = conditional_round(z, big, KeyStream(KEY, Purpose.DP_ROUNDING))
    want = conditional_round_reference(z, big, ReferenceKeyStream(KEY, Purpose.DP_ROUNDING))
    assert got.dtype == np.int64 and np.array_equal(got, want)


@pytest.mark.parametrize("bits", [1, 8, 19, 40, 62, 64])
def test_fused_centre_scale_is_bit_identical_to_the_numpy_formula(bits: int) -> None:
    """Decode KAT: the fused pass gives ``centre(v, bits).astype(float64) / gamma`` bit for
    bit, including ``0``, ``2^(b-1) - 1``, ``2^(b-1)`` and ``2^b - 1`` (the boundaries)."""
    from secagg.dp.encoding import centre_scaled

    rng = np.random.default_rng(bits)  # test data only
    v = rng.integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    top = (1 << bits) - 1
    edges = [0, max(0, (1 << (bits - 1)) - 1), 1 << (bits - 1), top]
    v[:4] = np.array(edges, dtype=np.uint64)
    gamma = 3620.3867196751235
    want = centre(v, bits).astype(np.float64) / gamma
    assert np.array_equal(centre_scaled(v, bits, gamma), want)
