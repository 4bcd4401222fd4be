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
from secagg.kernels import dp_noise_cuda
from secagg.dp.streams import dg_sample_reference
key = bytes(range(32))
for s2 in (1, 7, 7456898):
    out, flagged = dp_noise_cuda.discrete_gaussian(key, 16, s2, 40, blocks=1)
    want = [dg_sample_reference(key, i, s2) for i in range(40)]
    got = out.tolist()
    for i in flagged.tolist():
        got[i] = want[i]
    assert got == want, (s2, got, want)
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
    from secagg.dp.streams import discrete_gaussian_vector

    key = bytes(range(32))
    for s2 in (1, 29_818_379):
        cpu = discrete_gaussian_vector(key, s2, 100_000)
        gpu = discrete_gaussian_vector(key, s2, 100_000, backend="cuda")
        assert (cpu == gpu).all()
