"""The quantization and packing reference: exact integer properties."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from secagg.errors import ConfigurationError, InfeasibleParameters, InputError
from secagg.quantize import QuantSpec, dequantize, encode, pack, quantize, unpack


def test_lane_layout_headroom_and_packing() -> None:
    spec = QuantSpec(clip=1.0, bits=16, n_clients=100)
    assert spec.headroom_bits == 7
    assert spec.lane_bits == 23
    assert spec.lanes_per_word == 2
    assert spec.words(5) == 3
    weighted = QuantSpec(clip=1.0, bits=8, n_clients=2, max_weight=255)
    assert weighted.weight_bits == 8 and weighted.lane_bits == 17
    assert weighted.values(10) == 11


@given(
    bits=st.integers(1, 32),
    n=st.integers(1, 5000),
    count=st.integers(0, 300),
    data=st.data(),
)
def test_pack_unpack_roundtrip(bits: int, n: int, count: int, data: st.DataObject) -> None:
    spec = QuantSpec(clip=1.0, bits=bits, n_clients=n)
    top = (1 << spec.lane_bits) - 1
    vals = np.array(
        data.draw(st.lists(st.integers(0, top), min_size=count, max_size=count)),
        dtype=np.uint64,
    )
    words = pack(vals, spec)
    assert words.size == -(-count // spec.lanes_per_word)
    assert np.array_equal(unpack(words, spec, count), vals)


@given(n=st.integers(1, 64), bits=st.integers(1, 24), dim=st.integers(1, 50), data=st.data())
def test_sum_of_packed_words_is_packed_sum_of_lanes(
    n: int, bits: int, dim: int, data: st.DataObject
) -> None:
    """The headroom guarantees that mod-2^64 word sums never carry between lanes."""
    spec = QuantSpec(clip=1.0, bits=bits, n_clients=n)
    top = (1 << bits) - 1
    vecs = [np.full(dim, top, dtype=np.uint64) for _ in range(n)]  # worst case
    vecs[0][: dim // 2] = data.draw(st.integers(0, top))
    total = np.zeros(spec.words(dim), dtype=np.uint64)
    for v in vecs:
        total += pack(v, spec)
    assert np.array_equal(unpack(total, spec, dim), np.sum(vecs, axis=0, dtype=np.uint64))


def test_quantize_range_and_determinism() -> None:
    spec = QuantSpec(clip=2.0, bits=8, n_clients=4)
    key = secrets.token_bytes(32)
    x = np.array([-np.inf, -5.0, -2.0, 0.0, 2.0, 5.0, np.inf, 1e-300])
    q = quantize(x, spec, key)
    assert q[0] == q[1] == q[2] == 0
    assert q[4] == q[5] == q[6] == 255
    assert np.array_equal(q, quantize(x, spec, key))
    assert q.dtype == np.uint64


def test_stochastic_rounding_is_unbiased() -> None:
    spec = QuantSpec(clip=1.0, bits=4, n_clients=1)
    x = np.full(200_000, 0.123)
    q = quantize(x, spec, secrets.token_bytes(32))
    t = (0.123 + 1.0) * spec.scale
    assert set(np.unique(q)) == {np.floor(t), np.ceil(t)}
    # Mean of 200k Bernoulli draws: standard error ~ 0.001.
    assert abs(q.mean() - t) < 0.01


def test_encode_weighted_and_dequantize() -> None:
    spec = QuantSpec(clip=4.0, bits=20, n_clients=3, max_weight=1000)
    xs = [np.array([0.5, -1.25, 3.0]), np.array([1.0, 1.0, -4.0])]
    ws = [10, 990]
    total = np.zeros(spec.words(3), dtype=np.uint64)
    for x, w in zip(xs, ws, strict=True):
        total += encode(x, w, spec, secrets.token_bytes(32))
    sums = unpack(total, spec, spec.values(3))
    wsum, weight = dequantize(sums, spec, 2, 3)
    assert weight == 1000
    expected = 10 * xs[0] + 990 * xs[1]
    assert np.allclose(wsum, expected, atol=1000 / spec.scale)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"clip": 0.0, "bits": 8, "n_clients": 2}, ConfigurationError),
        ({"clip": float("nan"), "bits": 8, "n_clients": 2}, ConfigurationError),
        ({"clip": 1.0, "bits": 0, "n_clients": 2}, ConfigurationError),
        ({"clip": 1.0, "bits": 33, "n_clients": 2}, ConfigurationError),
        ({"clip": 1.0, "bits": 8, "n_clients": 0}, ConfigurationError),
        ({"clip": 1.0, "bits": 32, "n_clients": 2**20, "max_weight": 2**20}, InfeasibleParameters),
    ],
)
def test_bad_specs(kwargs: dict[str, float], error: type[Exception]) -> None:
    with pytest.raises(error):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    spec = QuantSpec(clip=1.0, bits=8, n_clients=2, max_weight=5)
    key = secrets.token_bytes(32)
    with pytest.raises(InputError):
        quantize(np.array([0.0, np.nan]), spec, key)
    with pytest.raises(InputError):
        quantize(np.zeros((2, 2)), spec, key)
    with pytest.raises(InputError):
        encode(np.zeros(3), 6, spec, key)
    with pytest.raises(InputError):
        encode(np.zeros(3), 0, spec, key)
