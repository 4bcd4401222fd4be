"""CUDA kernels under Numba's simulator, against the reference, bit for bit.

``NUMBA_ENABLE_CUDASIM=1`` must be set before ``numba.cuda`` is imported, so this file is not
collected by the normal run (its name does not start with ``test_``): it is run in a
subprocess by ``tests/test_kernels_cuda.py::test_cuda_kernels_under_simulator``. By hand::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim_kernels.py -q

The simulator runs every CUDA thread as a Python thread, so sizes stay tiny (a few tiles of
ChaCha20 blocks at most).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from secagg.kernels import config

if not config.simulator():
    pytest.skip("needs NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)

from numba import cuda

from secagg import kernels
from secagg.errors import InputError
from secagg.kernels import chacha
from secagg.kernels import cuda as cuda_kernels
from secagg.kernels import reference as ref
from secagg.prg import Purpose, StreamMask, keystream_bytes, nonce_for
from secagg.quantize import QuantSpec
from secagg.quantize import dequantize as np_dequantize
from secagg.quantize import unpack as np_unpack

# numpy scalars warn on the wrap-around that ChaCha20 and mod-2^64 sums rely on
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
warnings.simplefilter("ignore", RuntimeWarning)

SPECS = [
    QuantSpec(clip=2.0, bits=16, n_clients=1000),  # L=26, P=2
    QuantSpec(clip=1.5, bits=8, n_clients=5, max_weight=7),  # L=14, P=4, weighted
    QuantSpec(clip=1.0, bits=32, n_clients=2),  # L=33, P=1
    QuantSpec(clip=0.5, bits=12, n_clients=300, max_weight=3),  # L=23, P=2, weighted
]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(8), "little"))


def _masks(k: int, rng: np.random.Generator) -> list[StreamMask]:
    return [
        StreamMask(os.urandom(32), Purpose(int(rng.integers(1, 6))), int(s))
        for s in rng.choice([1, -1, 0], size=k)
    ]


def _vector(dim: int, clip: float, rng: np.random.Generator, dtype: str) -> np.ndarray:
    x = rng.normal(scale=clip, size=dim) * 1.3
    if dim > 3:
        x[:4] = [clip, -clip, np.inf, -0.0]
    return x.astype(dtype)


def test_keystream_kernel_offsets() -> None:
    key = os.urandom(32)
    for purpose, offset, nbytes in [(Purpose.ROUNDING, 0, 64), (Purpose.PAIR_MASK, 70, 130),
                                    (Purpose.SELF_MASK, 64 * 1000 + 1, 63)]:  # fmt: skip
        got = kernels.keystream(key, nonce_for(purpose), nbytes, offset)
        assert got == keystream_bytes(key, purpose, nbytes, offset)


def test_keystream_kernel_rfc_vector() -> None:
    # RFC 8439 section 2.3.2: key 00..1f, nonce 00 00 00 09 00 00 00 4a 00 00 00 00, counter 1
    out = cuda_kernels.keystream_words(
        chacha.key_words(bytes(range(32))),
        chacha.nonce_words(bytes.fromhex("000000090000004a00000000")),
        1,
        1,
    ).copy_to_host()
    assert out.tobytes().hex().startswith("10f1e7e4d13b5915500fdd1fa32071c4")
    assert out.tobytes().hex().endswith("cbd083e8a2503c4e")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"L{s.lane_bits}")
@pytest.mark.parametrize("dim", [0, 1, 17, 31, 32])  # 31/32: lanes end exactly on a word
def test_fused_mask_small(spec: QuantSpec, dim: int, rng) -> None:  # type: ignore[no-untyped-def]
    x = _vector(dim, spec.clip, rng, "float32" if dim % 2 else "float64")
    weight = int(rng.integers(1, spec.max_weight + 1))
    rkey, masks = os.urandom(32), _masks(dim % 4, rng)
    out = kernels.mask_vector(cuda.to_device(x), weight, spec, rkey, masks)
    assert kernels.is_device_array(out)
    assert np.array_equal(out.copy_to_host(), ref.mask_vector(x, weight, spec, rkey, masks))


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_fused_mask_every_count(k: int, rng) -> None:  # type: ignore[no-untyped-def]
    spec = SPECS[k % 2]
    x = _vector(23, spec.clip, rng, "float64")
    rkey, masks = os.urandom(32), _masks(k, rng)
    out = kernels.mask_vector(cuda.to_device(x), 1, spec, rkey, masks).copy_to_host()
    assert np.array_equal(out, ref.mask_vector(x, 1, spec, rkey, masks))


def test_fused_mask_two_tiles_one_block(rng, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """More words than a tile (2,032), walked grid-stride by a single CUDA block."""
    monkeypatch.setattr(cuda_kernels, "max_grid", lambda: 1)
    spec = SPECS[2]  # one lane per word: words = dim
    dim = config.CUDA_TILE_WORDS + 21
    x = _vector(dim, spec.clip, rng, "float32")
    rkey, masks = os.urandom(32), _masks(1, rng)
    out = kernels.mask_vector(cuda.to_device(x), 1, spec, rkey, masks).copy_to_host()
    assert np.array_equal(out, ref.mask_vector(x, 1, spec, rkey, masks))


def test_fused_mask_nan(rng) -> None:  # type: ignore[no-untyped-def]
    x = rng.normal(size=30)
    x[29] = np.nan
    with pytest.raises(InputError, match="NaN"):
        kernels.mask_vector(cuda.to_device(x), 1, SPECS[0], os.urandom(32), [])


@pytest.mark.parametrize("words", [1, 9, 70, 2 * 16 * config.CUDA_THREADS + 3])
def test_add_masks_device(words: int, rng, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cuda_kernels, "max_grid", lambda: 2)
    acc = rng.integers(0, 1 << 64, size=words, dtype=np.uint64)
    masks = _masks(1 if words > 100 else 3, rng)
    dacc = cuda.to_device(acc)
    kernels.add_masks(dacc, masks)
    ref.add_masks(acc, masks)
    assert np.array_equal(dacc.copy_to_host(), acc)


def test_unpack_device(rng) -> None:  # type: ignore[no-untyped-def]
    for spec in SPECS:
        w = rng.integers(0, 1 << 64, size=13, dtype=np.uint64)
        count = 13 * spec.lanes_per_word - 1
        got = kernels.unpack(cuda.to_device(w), spec, count)
        assert np.array_equal(got.copy_to_host(), np_unpack(w, spec, count))


def test_dequantize_device(rng) -> None:  # type: ignore[no-untyped-def]
    for spec in SPECS:
        for dim in (0, 1, 29):
            sums = rng.integers(0, 1 << spec.lane_bits, size=spec.values(dim), dtype=np.uint64)
            got, total = kernels.dequantize(cuda.to_device(sums), spec, 5, dim)
            want, want_total = np_dequantize(sums, spec, 5, dim)
            assert total == want_total
            assert got.copy_to_host().tobytes() == want.tobytes()


def test_dispatch_rules(rng, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    spec, rkey = SPECS[0], os.urandom(32)
    x = _vector(9, spec.clip, rng, "float64")
    want = ref.mask_vector(x, 1, spec, rkey, [])
    # auto: device in -> CUDA, device out; host in -> host out
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert kernels.is_device_array(kernels.mask_vector(cuda.to_device(x), 1, spec, rkey, []))
    assert isinstance(kernels.mask_vector(x, 1, spec, rkey, []), np.ndarray)
    # forced cpu / reference with a device array: computed on the host, returned on device
    for name in ("cpu", "reference"):
        monkeypatch.setenv(config.ENV_VAR, name)
        out = kernels.mask_vector(cuda.to_device(x), 1, spec, rkey, [])
        assert kernels.is_device_array(out)
        assert np.array_equal(out.copy_to_host(), want)
    # forced cuda with a host array: computed on the device, returned on the host
    monkeypatch.setenv(config.ENV_VAR, "cuda")
    out = kernels.mask_vector(x, 1, spec, rkey, [])
    assert isinstance(out, np.ndarray) and np.array_equal(out, want)
    acc = want.copy()
    masks = _masks(2, rng)
    kernels.add_masks(acc, masks)
    ref.add_masks(want, masks)
    assert np.array_equal(acc, want)
    assert kernels.keystream(rkey, nonce_for(Purpose.GRAPH), 100, 3) == keystream_bytes(
        rkey, Purpose.GRAPH, 100, 3
    )


# --- the protocol core and the SDK keep device updates on the device ----------------------


def _watch_host_copies(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every simulated device array copied to the host, by any route."""
    fake = type(cuda.to_device(np.zeros(1)))  # wraps a numpy array as ``_ary``
    seen: list[object] = []
    real_copy = fake.copy_to_host

    def copy_to_host(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(self)
        return real_copy(self, *args, **kwargs)

    def as_array(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(self)
        return self._ary.__array__(*args, **kwargs)

    def interface(name: str) -> property:
        def get(self):  # type: ignore[no-untyped-def]
            seen.append(self)
            return getattr(self._ary, name)

        return property(get)

    monkeypatch.setattr(fake, "copy_to_host", copy_to_host)
    # np.asarray(x) would reach the wrapped array through any of these
    monkeypatch.setattr(fake, "__array__", as_array, raising=False)
    for name in ("__array_interface__", "__array_struct__"):
        monkeypatch.setattr(fake, name, interface(name), raising=False)
    return seen


def test_masked_round_with_device_updates(rng, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from secagg.params import make_params
    from secagg.quantize import lane_values
    from secagg.simulate import run_round

    monkeypatch.delenv(config.ENV_VAR, raising=False)
    params = make_params(4, 37, clip=2.0, bits=12, max_weight=3, neighbors="all")
    host = {c: np.clip(rng.normal(size=37), -2, 2) for c in range(1, 5)}
    inputs: dict[int, object] = {
        1: cuda.to_device(host[1]),  # float64 on the device
        2: cuda.to_device(host[2].astype(np.float32)),  # float32 on the device
        3: host[3],
        4: host[4],
    }
    host[2] = host[2].astype(np.float32).astype(np.float64)
    weights = {1: 1, 2: 3, 3: 2, 4: 1}
    seen = _watch_host_copies(monkeypatch)
    server, _, rounding = run_round(params, inputs, weights, {})  # type: ignore[arg-type]
    assert not any(x is inputs[1] or x is inputs[2] for x in seen), "an update left the device"
    result = server.result
    assert result is not None and result.sums is not None
    expected = sum(lane_values(host[c], weights[c], params.quant, rounding[c]) for c in host)
    assert np.array_equal(result.sums, expected)


def test_client_refuses_bad_device_updates() -> None:
    from secagg.client import SecAggClient
    from secagg.errors import KernelError
    from secagg.keys import IdentityKey
    from secagg.params import make_params

    params = make_params(3, 4, neighbors="all")
    me = IdentityKey()
    directory = {1: me.public, 2: IdentityKey().public, 3: IdentityKey().public}
    bad = {
        "NaN": (cuda.to_device(np.array([0.0, np.nan, 1.0, 2.0])), InputError),
        "2-D": (cuda.to_device(np.zeros((2, 2))), InputError),
        "length": (cuda.to_device(np.zeros(5)), InputError),
        "dtype": (cuda.to_device(np.zeros(4, dtype=np.int32)), KernelError),
    }
    for name, (x, err) in bad.items():
        with pytest.raises(err):
            SecAggClient(1, me, params, directory, x)
            pytest.fail(name)


def test_sdk_flatten_keeps_a_device_update_on_the_device(rng) -> None:  # type: ignore[no-untyped-def]
    from secagg.service.tensors import flatten, unflatten

    x = cuda.to_device(rng.normal(size=(3, 5)).astype(np.float32))
    vec, layout = flatten({"w": x})
    assert layout.on_device and kernels.is_device_array(vec) and tuple(vec.shape) == (15,)
    back = unflatten(np.arange(15, dtype=np.float64), layout)["w"]
    assert kernels.is_device_array(back) and back.shape == (3, 5)
    assert np.array_equal(back.copy_to_host(), np.arange(15, dtype=np.float32).reshape(3, 5))
    # two device leaves, or integer ones, take the host path
    vec2, layout2 = flatten({"a": x, "b": cuda.to_device(np.ones(2))})
    assert not layout2.on_device and isinstance(vec2, np.ndarray) and vec2.size == 17
    vec3, layout3 = flatten(cuda.to_device(np.arange(3, dtype=np.int64)))
    assert not layout3.on_device and np.array_equal(vec3, [0.0, 1.0, 2.0])
