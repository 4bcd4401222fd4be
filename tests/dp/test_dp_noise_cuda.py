"""CUDA noise kernel (kernels/dp_noise_cuda.py) under Numba's simulator, and on a real GPU.

The simulator must be on before ``numba.cuda`` is first imported, so that check runs in a
child interpreter with ``NUMBA_ENABLE_CUDASIM=1`` (as tests/test_kernels_cuda.py does).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

_HAS_NUMBA_CUDA = importlib.util.find_spec("numba.cuda") is not None

_CHILD = """
import numpy as np
from secagg.kernels import dp_noise, dp_noise_cuda
from secagg.kernels.chacha import key_words
from secagg.dp.streams import dg_chunk_reference
key = bytes(range(32))
# 300 coordinates = a whole chunk and part of a second; small grids make threads loop.
for s2 in (1, 7, 7456898):
    out, flags = dp_noise_cuda.discrete_gaussian(key, 16, s2, 300, blocks=1)
    want = dg_chunk_reference(key, 0, s2, 256) + dg_chunk_reference(key, 1, s2, 44)
    assert not flags.any() and out.tolist() == want, (s2, out.tolist(), want)
# The batched sum equals the CPU kernel's, flags included (amax = 0 is not forced here).
keys = np.stack([key_words(bytes([k]) * 32) for k in range(3)])
gpu, gflags = dp_noise_cuda.discrete_gaussian_sum(keys, 16, [5, 900, 29818379], 260, blocks=2)
cpu, cflags = dp_noise.discrete_gaussian_sum(keys, 16, [5, 900, 29818379], 260)
assert (gpu == cpu).all() and (gflags == cflags).all()
print("ok")
"""


@pytest.mark.skipif(not _HAS_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_cuda_noise_kernel_matches_reference_under_simulator() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


@pytest.mark.gpu
def test_cuda_noise_kernel_matches_cpu_on_device() -> None:
    from secagg.kernels import config

    if config.simulator() or not config.cuda_available():
        pytest.skip("needs a real CUDA device")
    from secagg.dp.streams import discrete_gaussian_sum, discrete_gaussian_vector

    key = bytes(range(32))
    for s2 in (1, 29_818_379):
        cpu = discrete_gaussian_vector(key, s2, 100_000)
        gpu = discrete_gaussian_vector(key, s2, 100_000, backend="cuda")
        assert (cpu == gpu).all()
    keys = [bytes([k]) * 32 for k in range(70)]  # more rows than one launch takes
    s2s = [4 + 1000 * k for k in range(70)]
    cpu = discrete_gaussian_sum(keys, s2s, 70_000)
    assert (cpu == discrete_gaussian_sum(keys, s2s, 70_000, backend="cuda")).all()
