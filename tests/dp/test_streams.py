"""Chunked noise streams: the Numba kernel against the exact scalar reference, bit for bit.

Statistical checks use fixed keys; thresholds at false-alarm rate 1e-4 (as test_sampling).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from secagg.dp import streams
from secagg.dp.sampling import discrete_gaussian_pmf, max_integer_variance
from secagg.dp.streams import (
    COORDS_PER_STREAM,
    chunk_nonce,
    dg_chunk_reference,
    dg_sample_reference,
    discrete_gaussian_sum,
    discrete_gaussian_vector,
)
from secagg.errors import ConfigurationError
from secagg.kernels import dp_noise
from secagg.prg import Purpose, keystream_u64, nonce_for

chi2 = pytest.importorskip("scipy.stats").chi2

KEY = bytes(range(32))


def test_nonce_layout() -> None:
    assert COORDS_PER_STREAM == dp_noise.COORDS_PER_STREAM == 256
    assert chunk_nonce(0) == nonce_for(Purpose.DP_NOISE)
    assert chunk_nonce(1) == bytes([16, 1]) + bytes(10)
    assert chunk_nonce(2**64 - 1) == bytes([16]) + b"\xff" * 8 + bytes(3)
    with pytest.raises(ConfigurationError):
        chunk_nonce(2**64)
    # Chunk 0 reads the plain DP_NOISE keystream as 32-bit words, low half first.
    w = streams.ChunkWords(KEY, 0)
    first = int(keystream_u64(KEY, Purpose.DP_NOISE, 1)[0])
    assert (w.next(), w.next()) == (first & 0xFFFFFFFF, first >> 32)


def test_known_answers() -> None:
    """Pinned outputs of the layout (they change only with the specification, docs/dp.md)."""
    assert dg_chunk_reference(KEY, 0, 1000, 8) == [-11, -12, -24, -5, 15, 21, 44, -44]
    assert dg_chunk_reference(KEY, 3, 29_818_379, 4) == [3587, 10603, 6138, 3235]
    got = discrete_gaussian_vector(KEY, 29_818_379, 3 * 256 + 4)
    assert got[3 * 256 :].tolist() == [3587, 10603, 6138, 3235]


@pytest.mark.parametrize("m", [1, 2, 3, 7, 1000, 4095, 65535])
def test_lemire_rule_is_exactly_uniform(m: int) -> None:
    """Exhaustive at 16 bits (the sampler uses the same rule at 32 and 64): every value in
    ``[0, m)`` has exactly ``floor(2^16 / m)`` accepted preimages."""
    counts = [0] * m
    for u in range(1 << 16):
        r = streams.lemire(u, m, 16)
        if r is not None:
            counts[r] += 1
    assert counts == [(1 << 16) // m] * m


@pytest.mark.parametrize("sigma2", [1, 2, 7, 100, 10**6, max_integer_variance()])
def test_kernel_matches_reference_bit_for_bit(sigma2: int) -> None:
    count = 2 * COORDS_PER_STREAM + 37  # two whole chunks and a partial one
    got = discrete_gaussian_vector(KEY, sigma2, count)
    want: list[int] = []
    for c in range(3):
        want += dg_chunk_reference(KEY, c, sigma2, min(COORDS_PER_STREAM, count - 256 * c))
    assert got.tolist() == want
    assert int(got[300]) == dg_sample_reference(KEY, 300, sigma2)


def test_batched_sum_equals_sum_of_vectors() -> None:
    keys = [bytes([k]) * 32 for k in range(5)]
    s2s = [4, 77, 10**4, 2_302_578, 29_818_379]
    want = sum(discrete_gaussian_vector(k, s, 1000) for k, s in zip(keys, s2s, strict=True))
    assert (discrete_gaussian_sum(keys, s2s, 1000) == want).all()
    assert (discrete_gaussian_sum([], [], 10) == 0).all()
    with pytest.raises(ConfigurationError):
        discrete_gaussian_sum(keys, s2s[:2], 10)


def test_flagged_chunks_are_recomputed_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that flags every chunk (and adds nothing) still yields the reference vector."""
    real = dp_noise.discrete_gaussian_sum

    def all_flagged(keys, tag, sigma2s, count):  # type: ignore[no-untyped-def]
        out, flags = real(keys, tag, sigma2s, count)
        return np.zeros_like(out), np.ones_like(flags)

    monkeypatch.setattr(dp_noise, "discrete_gaussian_sum", all_flagged)
    got = discrete_gaussian_vector(KEY, 50, 300)
    assert got.tolist() == [
        *dg_chunk_reference(KEY, 0, 50, 256),
        *dg_chunk_reference(KEY, 1, 50, 44),
    ]
    monkeypatch.undo()
    # And the kernel really flags when told the products could overflow (amax = 0), leaving
    # the flagged rows out of the sum.
    params = dp_noise.sampler_params([50, 50])
    params[0, 4] = 0
    out = np.zeros(600, dtype=np.int64)
    flags = np.zeros((2, 3), dtype=np.bool_)
    keys = np.stack([dp_noise.key_words(KEY)] * 2)
    dp_noise._dg_sum_kernel(keys, 16, params, 600, out, flags)
    assert flags[0].all() and not flags[1].any()
    assert (out == discrete_gaussian_vector(KEY, 50, 600)).all()


def test_samples_do_not_depend_on_count_or_order() -> None:
    a = discrete_gaussian_vector(KEY, 1000, 5000)
    for n in (37, 256, 700):
        assert (a[:n] == discrete_gaussian_vector(KEY, 1000, n)).all()
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
