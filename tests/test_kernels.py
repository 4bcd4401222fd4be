"""Numba CPU kernels and the public kernel API against the numpy/pycryptodome reference.

Every comparison is bit for bit, on fresh random inputs of awkward sizes. The CUDA kernels
get the same treatment under the simulator in ``tests/cudasim_kernels.py`` (run by
``tests/test_kernels_cuda.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from Crypto.Cipher import ChaCha20

from secagg import kernels
from secagg.errors import ConfigurationError, InputError, KernelError
from secagg.kernels import api, config
from secagg.kernels import reference as ref
from secagg.prg import Purpose, StreamMask, keystream_bytes, nonce_for
from secagg.quantize import QuantSpec
from secagg.quantize import dequantize as np_dequantize
from secagg.quantize import unpack as np_unpack

VECTORS = json.loads((Path(__file__).parent / "vectors" / "chacha20_rfc8439.json").read_text())

# Lane widths L = bits + weight bits + headroom: 26 (P=2), 13 (P=4), 1 (P=64), 33 (P=1),
# 21 (P=3), 64 (P=1, full word).
SPECS = [
    QuantSpec(clip=2.0, bits=16, n_clients=1000),
    QuantSpec(clip=1.5, bits=8, n_clients=5, max_weight=7),
    QuantSpec(clip=3.0, bits=1, n_clients=1),
    QuantSpec(clip=1.0, bits=32, n_clients=2),
    QuantSpec(clip=0.5, bits=12, n_clients=300, max_weight=3),
    QuantSpec(clip=4.0, bits=32, n_clients=1 << 20, max_weight=4095),
]
SPEC_IDS = [f"L{s.lane_bits}P{s.lanes_per_word}{'w' if s.weighted else ''}" for s in SPECS]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(8), "little"))


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Force a backend through the environment variable, as an operator would."""

    def _use(name: str) -> None:
        monkeypatch.setenv(config.ENV_VAR, name)

    return _use


def _masks(k: int, rng: np.random.Generator) -> list[StreamMask]:
    purposes = list(Purpose)
    return [
        StreamMask(os.urandom(32), purposes[int(rng.integers(len(purposes)))], int(s))
        for s in rng.choice([1, -1, 0, 2, -5], size=k)
    ]


def _vector(dim: int, spec: QuantSpec, rng: np.random.Generator, dtype: str) -> np.ndarray:
    """Values around and beyond the clip range, with exact edges mixed in."""
    x = rng.normal(scale=spec.clip, size=dim) * 1.3
    if dim:
        edges = [spec.clip, -spec.clip, 0.0, -0.0, np.inf, -np.inf, 1e-300, spec.clip * 0.5]
        idx = rng.integers(dim, size=min(dim, len(edges)))
        x[idx] = edges[: idx.size]
    if dtype == "int":
        return np.round(np.clip(x, -1e6, 1e6)).astype(np.int64)
    return x.astype(dtype)


# --- ChaCha20: RFC 8439 vectors and pycryptodome ----------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("vec", VECTORS["block"], ids=lambda v: v["name"][-12:])
def test_rfc8439_block_vectors(vec: dict[str, object], backend: str, use) -> None:  # type: ignore[no-untyped-def]
    use(backend)
    key, nonce = bytes.fromhex(str(vec["key"])), bytes.fromhex(str(vec["nonce"]))
    got = kernels.keystream(key, nonce, 64, offset=64 * int(str(vec["counter"])))
    assert got.hex() == vec["keystream"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rfc8439_encryption_vector(backend: str, use) -> None:  # type: ignore[no-untyped-def]
    use(backend)
    (vec,) = VECTORS["encryption"]
    pt = bytes.fromhex(vec["plaintext"])
    ks = kernels.keystream(
        bytes.fromhex(vec["key"]), bytes.fromhex(vec["nonce"]), len(pt), 64 * vec["counter"]
    )
    assert bytes(a ^ b for a, b in zip(pt, ks, strict=True)).hex() == vec["ciphertext"]


def test_block_function_vectors_direct() -> None:
    """The shared block function itself, through the CPU keystream kernel."""
    from secagg.kernels import chacha, cpu

    for vec in VECTORS["block"]:
        key = chacha.key_words(bytes.fromhex(vec["key"]))
        nonce = chacha.nonce_words(bytes.fromhex(vec["nonce"]))
        words = cpu.keystream_words(key, nonce, vec["counter"], 1)
        assert words.tobytes().hex() == vec["keystream"]


@pytest.mark.parametrize("purpose", list(Purpose))
def test_keystream_matches_pycryptodome(purpose: Purpose, use, rng) -> None:  # type: ignore[no-untyped-def]
    use("cpu")
    key = os.urandom(32)
    nonce = nonce_for(purpose)
    for offset, nbytes in [(0, 0), (0, 1), (0, 64), (1, 63), (63, 2), (64, 64), (5, 1000),
                           (int(rng.integers(1 << 20)), int(rng.integers(1, 5000))),
                           (int(rng.integers(1 << 30)), 64 * 17 + 3)]:  # fmt: skip
        want = keystream_bytes(key, purpose, nbytes, offset)
        assert kernels.keystream(key, nonce, nbytes, offset) == want, (offset, nbytes)


def test_keystream_large_and_last_block(use) -> None:  # type: ignore[no-untyped-def]
    use("cpu")
    key, nonce = os.urandom(32), os.urandom(12)
    want = ChaCha20.new(key=key, nonce=nonce).encrypt(bytes(200_003))
    assert kernels.keystream(key, nonce, 200_003) == want
    # the last block secagg uses (counter 2^32 - 2; see secagg.prg.MAX_STREAM_BYTES)
    last = 64 * ((1 << 32) - 2)
    cipher = ChaCha20.new(key=key, nonce=nonce)
    cipher.seek(last)
    assert kernels.keystream(key, nonce, 64, last) == cipher.encrypt(bytes(64))
    with pytest.raises(ConfigurationError):
        kernels.keystream(key, nonce, 65, last)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_keystream_rejects_bad_arguments(backend: str, use) -> None:  # type: ignore[no-untyped-def]
    use(backend)
    with pytest.raises(ConfigurationError):
        kernels.keystream(bytes(31), bytes(12), 10)
    with pytest.raises(ConfigurationError):
        kernels.keystream(bytes(32), bytes(8), 10)
    with pytest.raises(ConfigurationError):
        kernels.keystream(bytes(32), bytes(12), -1)
    with pytest.raises(ConfigurationError):
        kernels.keystream(bytes(32), bytes(12), 1, offset=-1)


# --- fused mask ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_mask_vector_awkward_sizes(spec: QuantSpec, use, rng) -> None:  # type: ignore[no-untyped-def]
    """Sizes 0, 1, odd, around lane and 16-word boundaries, mask counts 0..3, signs mixed."""
    use("cpu")
    p = spec.lanes_per_word
    dims = {0, 1, 2, 3, 15, 16, 17, 31, 33, 127, 129, 8 * p - 1, 16 * p + 1, 2 * p, 2 * p + 1}
    dims.update(int(d) for d in rng.integers(1, 700, size=3))
    for i, dim in enumerate(sorted(dims)):
        x = _vector(dim, spec, rng, ["float64", "float32", "int"][i % 3])
        weight = int(rng.integers(1, spec.max_weight + 1))
        rkey = os.urandom(32)
        masks = _masks(i % 4, rng)
        got = kernels.mask_vector(x, weight, spec, rkey, masks)
        want = ref.mask_vector(x, weight, spec, rkey, masks)
        assert got.dtype == np.uint64 and got.shape == want.shape
        assert np.array_equal(got, want), (dim, weight, len(masks))


@pytest.mark.parametrize("k", range(6))
def test_mask_vector_every_mask_count(k: int, use, rng) -> None:  # type: ignore[no-untyped-def]
    use("cpu")
    spec = SPECS[k % len(SPECS)]
    dim = int(rng.integers(300, 3000))
    x = _vector(dim, spec, rng, "float32")
    weight = spec.max_weight
    rkey, masks = os.urandom(32), _masks(k, rng)
    assert np.array_equal(
        kernels.mask_vector(x, weight, spec, rkey, masks),
        ref.mask_vector(x, weight, spec, rkey, masks),
    )


@pytest.mark.parametrize("lane_bits_spec", [SPECS[3], SPECS[0]], ids=["P1", "P2"])
def test_mask_vector_many_chunks(lane_bits_spec: QuantSpec, use, rng) -> None:  # type: ignore[no-untyped-def]
    """More words than one CPU chunk (2,032), ending mid-chunk and mid-block."""
    use("cpu")
    spec = lane_bits_spec
    for words in (config.CPU_CHUNK_WORDS, config.CPU_CHUNK_WORDS + 1, 3 * 2032 + 13):
        dim = words * spec.lanes_per_word - int(rng.integers(spec.lanes_per_word))
        x = _vector(dim, spec, rng, "float64")
        rkey, masks = os.urandom(32), _masks(3, rng)
        got = kernels.mask_vector(x, 1, spec, rkey, masks)
        assert got.size == spec.words(dim)
        assert np.array_equal(got, ref.mask_vector(x, 1, spec, rkey, masks))


def test_mask_vector_rounding_edges(use) -> None:  # type: ignore[no-untyped-def]
    """Values whose scaled value lands exactly on an integer, and the top of the range."""
    use("cpu")
    spec = QuantSpec(clip=1.0, bits=4, n_clients=2)
    levels = np.arange(spec.max_level + 1) / spec.scale - spec.clip
    x = np.concatenate([levels, np.nextafter(levels, np.inf), np.nextafter(levels, -np.inf)])
    rkey = os.urandom(32)
    assert np.array_equal(
        kernels.mask_vector(x, 1, spec, rkey, []), ref.mask_vector(x, 1, spec, rkey, [])
    )


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_mask_vector_nan_is_input_error(backend: str, use, rng) -> None:  # type: ignore[no-untyped-def]
    use(backend)
    spec = SPECS[0]
    for pos in (0, 4999, 2500):
        x = rng.normal(size=5000)
        x[pos] = np.nan
        with pytest.raises(InputError, match="NaN"):
            kernels.mask_vector(x, 1, spec, os.urandom(32), _masks(2, rng))
        with pytest.raises(InputError, match="NaN"):  # NaN is reported before a bad key
            kernels.mask_vector(x, 1, spec, os.urandom(31), [])


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_mask_vector_errors_match_reference(backend: str, use) -> None:  # type: ignore[no-untyped-def]
    use(backend)
    spec, wspec = SPECS[0], SPECS[1]
    x = np.ones(100)
    cases = [
        (lambda: kernels.mask_vector(x, 0, wspec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(x, 8, wspec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(x, True, wspec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(x, 1.0, wspec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(np.ones((2, 50)), 1, spec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(np.ones(100, bool), 1, spec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(np.ones(100, complex), 1, spec, bytes(32), []), InputError),
        (lambda: kernels.mask_vector(x, 1, spec, bytes(16), []), ConfigurationError),
        (
            lambda: kernels.mask_vector(
                x, 1, spec, bytes(32), [StreamMask(bytes(33), Purpose.PAIR_MASK, 1)]
            ),
            ConfigurationError,
        ),
    ]
    for call, exc in cases:
        with pytest.raises(exc):
            call()


# --- fused unmask -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "words", [0, 1, 7, 8, 9, 63, 64, 1000, 2032, 2033, 4101, 32768, 32769, 70001]
)
def test_add_masks_matches_reference(words: int, use, rng) -> None:  # type: ignore[no-untyped-def]
    use("cpu")
    for k in (0, 1, 4):
        acc = rng.integers(0, 1 << 64, size=words, dtype=np.uint64)
        want = acc.copy()
        masks = _masks(k, rng)
        ref.add_masks(want, masks)
        kernels.add_masks(acc, masks)
        assert np.array_equal(acc, want), (words, k)


def test_masks_cancel_server_side(use, rng) -> None:  # type: ignore[no-untyped-def]
    """Masking then unmasking with the same streams gives the plain encoding back."""
    use("cpu")
    spec = SPECS[1]
    x = rng.normal(size=999)
    rkey, masks = os.urandom(32), _masks(5, rng)
    masked = kernels.mask_vector(x, 3, spec, rkey, masks)
    kernels.add_masks(masked, [m._replace(sign=-1 if m.sign > 0 else 1) for m in masks])
    assert np.array_equal(masked, ref.mask_vector(x, 3, spec, rkey, []))


def test_add_masks_rejects_bad_accumulators(use) -> None:  # type: ignore[no-untyped-def]
    use("cpu")
    m = [StreamMask(bytes(32), Purpose.PAIR_MASK, 1)]
    for acc in (np.zeros(4, np.int64), np.zeros((2, 2), np.uint64), [0, 1]):
        with pytest.raises(KernelError):
            kernels.add_masks(acc, m)
    ro = np.zeros(4, np.uint64)
    ro.flags.writeable = False
    with pytest.raises(KernelError):
        kernels.add_masks(ro, m)
    with pytest.raises(ConfigurationError):
        kernels.add_masks(np.zeros(4, np.uint64), [StreamMask(bytes(3), Purpose.PAIR_MASK, 1)])


# --- unpack -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_unpack_matches_numpy(spec: QuantSpec, use, rng) -> None:  # type: ignore[no-untyped-def]
    use("cpu")
    for words in (0, 1, 5, 2033, 4500):
        w = rng.integers(0, 1 << 64, size=words, dtype=np.uint64)
        top = words * spec.lanes_per_word
        for count in {0, top, max(0, top - 1), top // 2}:
            assert np.array_equal(kernels.unpack(w, spec, count), np_unpack(w, spec, count))
    with pytest.raises(ConfigurationError):
        kernels.unpack(np.zeros(2, np.uint64), spec, 2 * spec.lanes_per_word + 1)


# --- dispatch -----------------------------------------------------------------------------


def test_import_is_light() -> None:
    code = "import sys, secagg.kernels; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_env_override_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.backend() == "auto"
    for name in config.BACKENDS:
        monkeypatch.setenv(config.ENV_VAR, f" {name.upper()} ")
        assert config.backend() == name
    monkeypatch.setenv(config.ENV_VAR, "gpu")
    with pytest.raises(KernelError, match="SECAGG_KERNELS"):
        kernels.mask_vector(np.ones(3), 1, SPECS[0], bytes(32), [])


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record which backend each public call reached."""
    calls: list[str] = []
    real_ref, real_cpu = api._reference, api._cpu

    class RefSpy:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            calls.append("reference")
            return getattr(real_ref, name)

    class CpuSpy:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            calls.append("cpu")
            return getattr(real_cpu(), name)

    class OpenSSLSpy:  # the CPU backend's mask streams (secagg.kernels.openssl)
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            calls.append("openssl")
            return getattr(real_openssl(), name)

    real_openssl = api._openssl
    monkeypatch.setattr(api, "_reference", RefSpy())
    monkeypatch.setattr(api, "_cpu", lambda: CpuSpy())
    monkeypatch.setattr(api, "_openssl", lambda: OpenSSLSpy())
    return calls


def test_auto_dispatch_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    calls = _spy(monkeypatch)
    spec = SPECS[0]  # 2 lanes per word
    small = np.ones(2 * config.SMALL_WORDS - 2)
    large = np.ones(2 * config.SMALL_WORDS)
    kernels.mask_vector(small, 1, spec, bytes(32), [])
    kernels.mask_vector(large, 1, spec, bytes(32), [])
    kernels.add_masks(np.zeros(config.SMALL_WORDS - 1, np.uint64), [])
    kernels.add_masks(np.zeros(config.SMALL_WORDS, np.uint64), [])
    assert calls == ["reference", "cpu", "openssl", "reference", "openssl"]


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_forced_backend_is_used(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_VAR, name)
    calls = _spy(monkeypatch)
    kernels.mask_vector(np.ones(5), 1, SPECS[0], bytes(32), [])
    kernels.mask_vector(np.ones(50_000), 1, SPECS[0], bytes(32), [])
    kernels.add_masks(np.zeros(3, np.uint64), [])
    expected = ["cpu", "openssl", "cpu", "openssl", "openssl"] if name == "cpu" else [name] * 3
    assert calls == expected


def test_forced_cuda_without_device_is_kernel_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_VAR, "cuda")
    monkeypatch.setattr(config, "cuda_available", lambda: False)
    with pytest.raises(KernelError, match="CUDA"):
        kernels.mask_vector(np.ones(500), 1, SPECS[0], bytes(32), [])
    with pytest.raises(KernelError, match="CUDA"):
        kernels.add_masks(np.zeros(500, np.uint64), [StreamMask(bytes(32), Purpose(1), 1)])


def test_device_detection() -> None:
    class FakeCAI:
        @property
        def __cuda_array_interface__(self) -> dict[str, object]:
            return {"shape": (3,), "typestr": "<f4", "version": 3}

    assert kernels.is_device_array(FakeCAI())
    assert not kernels.is_device_array(np.zeros(3))
    assert not kernels.is_device_array([1.0, 2.0])


def test_device_vector_dtype_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    class IntDeviceArray:
        __cuda_array_interface__ = None
        shape = (4,)
        dtype = np.dtype(np.int32)

    monkeypatch.setattr(api, "_as_device", lambda x: x)
    with pytest.raises(KernelError, match="float32 or float64"):
        kernels.mask_vector(IntDeviceArray(), 1, SPECS[0], bytes(32), [])


# --- dequantize ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_dequantize_matches_numpy(spec: QuantSpec, backend: str, use, rng) -> None:  # type: ignore[no-untyped-def]
    use(backend)
    for dim in (0, 1, 7, 2033, 70_001):
        n = spec.values(dim)
        sums = rng.integers(0, 1 << spec.lane_bits, size=n + 3, dtype=np.uint64)
        if spec.weighted:
            sums[dim] = rng.integers(1, 1 << 20)
        for contributors in (1, 97):
            got, total = kernels.dequantize(sums, spec, contributors, dim)
            want, want_total = np_dequantize(sums, spec, contributors, dim)
            assert total == want_total
            assert got.dtype == np.float64 and got.shape == (dim,)
            assert got.tobytes() == want.tobytes(), (dim, contributors)
    with pytest.raises(ConfigurationError):
        kernels.dequantize(np.zeros(2, np.uint64), spec, 1, spec.values(2) + 1)
    with pytest.raises(ConfigurationError):
        kernels.dequantize(np.zeros(2, np.uint64), spec, 1, -1)
