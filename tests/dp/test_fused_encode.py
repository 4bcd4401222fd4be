"""The fused encode/decode path against the numpy + pycryptodome specification, bit for bit.

:mod:`secagg.dp.reference` keeps the formulations the kernels of
:mod:`secagg.kernels.dp_encode` replaced; every output here must be *equal* (``==`` on the
float64 bits, signed zeros included), not close.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.dp import encoding, reference, rotation
from secagg.dp.packing import pack_ring, unpack_ring
from secagg.dp.randomness import KeyStream
from secagg.errors import InputError
from secagg.prg import Purpose, keystream_bytes

KEY = bytes(range(32))


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _vector(seed: int, dim: int, norm: float) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=dim)  # test data only, not secret
    return x * (norm / max(float(np.linalg.norm(x)), 1e-300))


@given(st.integers(0, 3), st.integers(1, 4000), st.sampled_from([0, 1, 7, 8, 9, 255, 300]))
def test_keystream_words_are_pycryptodome_bytes(seed: int, count: int, first: int) -> None:
    """OpenSSL's ChaCha20 through ``KeyStream`` gives pycryptodome's keystream, across
    reads of any size (short reads, the chunked long path, a read straddling blocks)."""
    key = bytes([seed]) * 32
    src = KeyStream(key, Purpose.DP_ROUNDING)
    got = np.concatenate([src.words(first), src.words(count)])
    want = keystream_bytes(key, Purpose.DP_ROUNDING, 8 * (first + count))
    assert got.astype("<u8").tobytes() == want
    assert src.bytes_used == 8 * (first + count)


def test_keystream_long_read_crosses_chunks() -> None:
    """A read of more than one 256 KiB chunk (an odd word count) and the read after it."""
    src = KeyStream(KEY, Purpose.DP_ROTATION)
    n = (1 << 16) + 3
    got = np.concatenate([src.words(n), src.words(5)])
    want = keystream_bytes(KEY, Purpose.DP_ROTATION, 8 * (n + 5))
    assert got.astype("<u8").tobytes() == want


@given(st.integers(1, 5000), st.integers(0, 50))
def test_rotate_and_unrotate_are_bit_identical(dim: int, seed: int) -> None:
    x = _vector(seed, dim, 3.0)
    x[:: max(1, dim // 3)] = 0.0  # zeros (signed after the sign flips) in the input too
    assert _same_bits(rotation.rotate(x, KEY), reference.rotate(x, KEY))
    assert _same_bits(rotation.sign_vector(KEY, dim), reference.sign_vector(KEY, dim))
    y = reference.rotate(x, KEY)
    assert _same_bits(rotation.unrotate(y, KEY, dim), reference.unrotate(y, KEY, dim))
    assert _same_bits(y, reference.rotate(x, KEY))  # unrotate left its input alone


@given(
    st.integers(1, 3000),
    st.integers(0, 50),
    st.sampled_from([0.01, 0.5, 1.0, 2.0, 40.0]),
    st.sampled_from([1.0, 37.5, 1000.0, 2.0**20]),
)
def test_encode_update_is_bit_identical(dim: int, seed: int, norm: float, gamma: float) -> None:
    """Clip (both sides of the clip norm), rotate, scale, round: the same integers and the
    same coins consumed as the numpy formulation with pycryptodome's stream."""
    x = _vector(seed, dim, norm)
    kw = {"clip": 1.0, "gamma": gamma, "beta": 0.5, "rotation_key": KEY}
    rkey = bytes([seed]) * 32
    src = KeyStream(rkey, Purpose.DP_ROUNDING)
    got = encoding.encode_update(x, **kw, rounding=src)  # type: ignore[arg-type]
    want = reference.encode_update(
        x,
        **kw,
        rounding=reference.ReferenceKeyStream(rkey, Purpose.DP_ROUNDING),  # type: ignore[arg-type]
    )
    assert _same_bits(got, want)
    assert src.bytes_used % (8 * got.size) == 0


def test_encode_update_redraws_like_the_reference() -> None:
    """A bound near the mean of ``||r||^2``, so about half the draws exceed it: the fused
    loop redraws exactly as the reference (same attempts, hence the same result)."""
    redraws = 0
    for seed in range(8):
        z = np.random.default_rng(seed).uniform(-4, 4, 64)  # test data only
        low = np.floor(z)
        bound = int((low**2 + (z - low) * (2 * low + 1)).sum())
        key = bytes([seed]) * 32
        src = KeyStream(key, Purpose.DP_ROUNDING)
        got = encoding.conditional_round(z, bound, src)
        want = reference.conditional_round(
            z, bound, reference.ReferenceKeyStream(key, Purpose.DP_ROUNDING)
        )
        assert _same_bits(got, want)
        redraws += src.bytes_used // (8 * 64) - 1
    assert redraws > 0


def test_norm_check_takes_the_exact_path_when_int64_could_wrap() -> None:
    """Coordinates near 2^40 over 2^10 entries: ``max^2 d >= 2^63``, so the fused pass's
    wrapping sum is not trusted and the exact Python-integer norm decides."""
    z = np.full(1024, float(2**40) + 0.25)
    exact = 1024 * (2**40) ** 2
    r = encoding.conditional_round(z, 1024 * (2**40 + 1) ** 2, KeyStream(KEY, Purpose.DP_ROUNDING))
    assert sum(int(v) ** 2 for v in r) >= exact
    with pytest.raises(InputError, match="conditional rounding"):
        encoding.conditional_round(z, exact - 1, KeyStream(KEY, Purpose.DP_ROUNDING))


def test_too_large_coordinate_refused() -> None:
    with pytest.raises(InputError, match="2\\^52"):
        encoding.conditional_round(
            np.array([0.0, 2.0**52]), 10, KeyStream(KEY, Purpose.DP_ROUNDING)
        )


def test_nan_and_infinity_refused_overflowing_norm_clipped_as_before() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(InputError, match="NaN or infinity"):
            encoding.clip_l2(np.array([1.0, bad]), 1.0)
        with pytest.raises(InputError, match="NaN or infinity"):
            encoding.encode_update(
                np.array([1.0, bad]), clip=1.0, gamma=1.0, beta=0.5, rotation_key=KEY,
                rounding=KeyStream(KEY, Purpose.DP_ROUNDING),
            )  # fmt: skip
    huge = np.array([1e200, -1e200, 3.0])  # finite, but ||x||^2 overflows: scaled by 0
    with np.errstate(over="ignore"):
        assert _same_bits(encoding.clip_l2(huge, 1.0), reference.clip_l2(huge, 1.0))


@given(st.integers(1, 2000), st.sampled_from([2, 13, 20, 31, 40, 62]), st.integers(0, 9))
def test_decode_sum_is_bit_identical(dim: int, bits: int, seed: int) -> None:
    d = rotation.padded_dim(dim)
    total = np.random.default_rng(seed).integers(0, 2**63, d, dtype=np.uint64)  # test data
    kw = {"bits": bits, "gamma": 1234.5, "rotation_key": KEY, "dim": dim}
    got = encoding.decode_sum(total, **kw)  # type: ignore[arg-type]
    assert _same_bits(got, reference.decode_sum(total, **kw))  # type: ignore[arg-type]


@given(
    st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=300),
    st.sampled_from([1, 20, 33, 62, 64]),
)
def test_to_ring_is_bit_identical(values: list[int], bits: int) -> None:
    v = np.array(values, dtype=np.int64)
    assert _same_bits(encoding.to_ring(v, bits), reference.to_ring(v, bits))


@given(st.integers(0, 3000), st.sampled_from([1, 7, 21, 26, 32, 33, 64]), st.integers(0, 5))
def test_pack_ring_is_bit_identical(count: int, lane: int, spare: int) -> None:
    per = 64 // lane
    words = -(-count // per) + spare
    gen = np.random.default_rng(count)  # test data only
    v = (
        gen.integers(0, 2**lane, count, dtype=np.uint64)
        if lane < 64
        else gen.integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True)
    )
    got = pack_ring(v, lane, words)
    assert _same_bits(got, reference.pack_ring(v, lane, words))
    bits = min(lane, 64)
    assert _same_bits(unpack_ring(got, lane, count, bits), v)


@pytest.mark.parametrize("log_n", [3, 11, 12, 15, 16, 18, 20])
def test_fwht_blocked_schedule_is_bit_identical(log_n: int) -> None:
    """The two-level schedule (L1 sub-blocks, L2 blocks, column tiles of the late stages)
    against the stage-by-stage reference: below, at and past each block size, an even and an
    odd number of late stages (2^20: 32 rows of 2^15, 2^18: 8 rows)."""
    n = 1 << log_n
    v = np.random.default_rng(log_n).normal(0, 1, n)  # test data only
    assert _same_bits(rotation.fwht(v), rotation.fwht_reference(v))
    iv = np.random.default_rng(log_n).integers(-(10**6), 10**6, n)
    assert _same_bits(rotation.fwht(iv), rotation.fwht_reference(iv))


@given(st.integers(0, 20000), st.integers(0, 3))
def test_norm_has_the_defined_order(dim: int, seed: int) -> None:
    """The kernel's blocked eight-lane sum of squares equals its numpy specification bit for
    bit (any length: whole blocks, a partial last block, a tail of fewer than eight)."""
    v = np.random.default_rng(seed).normal(size=dim) * 10.0 ** (seed - 1)  # test data only
    assert encoding.l2_norm(v) == reference.norm(v)
    if dim:
        assert math.isclose(encoding.l2_norm(v), float(np.linalg.norm(v)), rel_tol=1e-12)


def test_norm_is_the_same_for_every_thread_count() -> None:
    """The order is fixed by the blocks, not by how ``prange`` splits them: a run limited to
    one Numba thread gives the same bits as the default."""
    import numba

    v = np.random.default_rng(7).normal(size=300_001)  # test data only
    full = encoding.l2_norm(v)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert encoding.l2_norm(v) == full == reference.norm(v)
    finally:
        numba.set_num_threads(before)


def test_thread_knob_changes_no_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SECAGG_DP_THREADS`` (1 by default, 0 = all Numba threads) changes how the passes
    are scheduled, never their output; a malformed value is refused with the variable named."""
    from secagg.errors import KernelError

    x = _vector(5, 70_000, 2.0)
    kw = {"clip": 1.0, "gamma": 300.0, "beta": 0.5, "rotation_key": KEY}
    out = []
    for value in ("1", "0", "2"):
        monkeypatch.setenv("SECAGG_DP_THREADS", value)
        r = encoding.encode_update(x, **kw, rounding=KeyStream(KEY, Purpose.DP_ROUNDING))  # type: ignore[arg-type]
        ring = encoding.to_ring(r, 20)
        out.append(
            (r, encoding.decode_sum(ring, bits=20, gamma=300.0, rotation_key=KEY, dim=x.size))
        )
    assert all(_same_bits(a[0], out[0][0]) and _same_bits(a[1], out[0][1]) for a in out)
    monkeypatch.setenv("SECAGG_DP_THREADS", "two")
    with pytest.raises(KernelError, match="SECAGG_DP_THREADS"):
        rotation.rotate(x, KEY)


def test_cuda_forced_without_a_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """One dispatcher for the CPU/CUDA pair: ``SECAGG_KERNELS=cuda`` without a device (or the
    simulator) is a ``KernelError`` naming the variable, never a silent CPU fallback."""
    from secagg.errors import KernelError
    from secagg.kernels import config

    if config.cuda_available():
        pytest.skip("a CUDA device or the simulator is available here")
    monkeypatch.setenv("SECAGG_KERNELS", "cuda")
    with pytest.raises(KernelError, match="SECAGG_KERNELS=cuda"):
        rotation.rotate(np.ones(8), KEY)
