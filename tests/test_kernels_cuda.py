"""CUDA kernels: under the simulator (always, in a subprocess) and on a real GPU (marked).

The simulator must be switched on before ``numba.cuda`` is first imported, and this process
may already have imported it for real, so the simulator suite (``tests/cudasim_kernels.py``)
runs in a child ``pytest`` with ``NUMBA_ENABLE_CUDASIM=1``.

The ``gpu`` tests need a real device and are skipped without one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secagg import kernels
from secagg.kernels import config
from secagg.kernels import reference as ref
from secagg.prg import Purpose, StreamMask, keystream_bytes, nonce_for
from secagg.quantize import QuantSpec
from secagg.quantize import dequantize as np_dequantize
from secagg.quantize import unpack as np_unpack

_HAS_NUMBA_CUDA = importlib.util.find_spec("numba.cuda") is not None


def _real_gpu() -> bool:
    return not config.simulator() and config.cuda_available()


@pytest.mark.skipif(not _HAS_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_cuda_kernels_under_simulator() -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    env.pop(config.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(root / "tests" / "cudasim_kernels.py")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


@pytest.mark.skipif(not _HAS_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_gpu_check_script_under_simulator(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.py`` (run on a real GPU later) works end to end, tiny sizes."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--tiny", "--json", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " 0 failed" in proc.stdout
    report = json.loads(out.read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    assert {"d2d copy (numba)", "keystream kernel"} <= {r["name"] for r in report["timings"]}


# --- real GPU -----------------------------------------------------------------------------

gpu = pytest.mark.gpu


@pytest.fixture
def cuda():  # type: ignore[no-untyped-def]
    if not _real_gpu():
        pytest.skip("needs a CUDA device")
    from numba import cuda as numba_cuda

    return numba_cuda


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(8), "little"))


def _masks(k: int, rng: np.random.Generator) -> list[StreamMask]:
    return [
        StreamMask(os.urandom(32), Purpose(int(rng.integers(1, 6))), int(s))
        for s in rng.choice([1, -1], size=k)
    ]


@gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "spec",
    [QuantSpec(2.0, 16, 1000), QuantSpec(1.0, 8, 50, max_weight=9), QuantSpec(1.0, 32, 3)],
    ids=["P2", "P3w", "P1"],
)
def test_gpu_fused_mask_matches_cpu(cuda, spec: QuantSpec, dtype: str, rng, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for dim in (1, 1000, 1_000_003):
        x = (rng.normal(size=dim) * spec.clip * 1.2).astype(dtype)
        weight = spec.max_weight
        rkey, masks = os.urandom(32), _masks(5, rng)
        monkeypatch.setenv(config.ENV_VAR, "cpu")
        want = kernels.mask_vector(x, weight, spec, rkey, masks)
        monkeypatch.delenv(config.ENV_VAR)
        got = kernels.mask_vector(cuda.to_device(x), weight, spec, rkey, masks)
        assert np.array_equal(got.copy_to_host(), want), dim
        if dim < 5000:
            assert np.array_equal(want, ref.mask_vector(x, weight, spec, rkey, masks))


@gpu
def test_gpu_add_masks_and_unpack(cuda, rng) -> None:  # type: ignore[no-untyped-def]
    spec = QuantSpec(2.0, 16, 1000)
    for words in (1, 4097, 3_000_001):
        acc = rng.integers(0, 1 << 64, size=words, dtype=np.uint64)
        masks = _masks(9, rng)
        dacc = cuda.to_device(acc)
        kernels.add_masks(dacc, masks)
        os.environ[config.ENV_VAR] = "cpu"
        try:
            kernels.add_masks(acc, masks)
            count = words * spec.lanes_per_word - 1
            want = kernels.unpack(acc, spec, count)
        finally:
            del os.environ[config.ENV_VAR]
        assert np.array_equal(dacc.copy_to_host(), acc)
        got = kernels.unpack(cuda.to_device(acc), spec, count).copy_to_host()
        assert np.array_equal(got, want)
        dsum, total = kernels.dequantize(cuda.to_device(want), spec, 7, count)
        hsum, htotal = np_dequantize(want, spec, 7, count)
        assert total == htotal and dsum.copy_to_host().tobytes() == hsum.tobytes()
        if words < 5000:
            assert np.array_equal(want, np_unpack(acc, spec, count))


@gpu
def test_gpu_keystream(cuda, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(config.ENV_VAR, "cuda")
    key = os.urandom(32)
    for offset, nbytes in [(0, 1), (63, 1000), (64 * 12345 + 7, 1 << 20)]:
        got = kernels.keystream(key, nonce_for(Purpose.PAIR_MASK), nbytes, offset)
        assert got == keystream_bytes(key, Purpose.PAIR_MASK, nbytes, offset)


@gpu
def test_gpu_torch_tensor_zero_copy(cuda, rng) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    spec = QuantSpec(2.0, 16, 1000)
    x = torch.randn(100_000, device="cuda", dtype=torch.float32)
    rkey, masks = os.urandom(32), _masks(3, rng)
    got = kernels.mask_vector(x, 1, spec, rkey, masks)
    assert kernels.is_device_array(got)
    want = ref.mask_vector(x.cpu().numpy(), 1, spec, rkey, masks)
    assert np.array_equal(got.copy_to_host(), want)
