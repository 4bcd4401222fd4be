"""The CUDA twin of the DP encode/decode passes (kernels/dp_encode_cuda.py) under Numba's
simulator, bit for bit against the numpy specification (secagg/dp/reference.py).

The simulator must be on before ``numba.cuda`` is first imported, so the check runs in a
child interpreter with ``NUMBA_ENABLE_CUDASIM=1`` and ``SECAGG_KERNELS=cuda`` (as
tests/dp/test_dp_noise_cuda.py does); small sizes, the simulator runs each thread in Python.
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
from secagg.dp import encoding, reference, rotation
from secagg.dp.packing import pack_ring
from secagg.dp.randomness import KeyStream
from secagg.kernels import dp_encode
from secagg.prg import Purpose
assert dp_encode.kernels().__name__.endswith("dp_encode_cuda")
key = bytes(range(32))
same = lambda a, b: a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
for dim, norm in ((37, 3.0), (64, 0.5), (200, 1.0)):
    x = np.random.default_rng(dim).normal(size=dim)  # test data only
    x *= norm / np.linalg.norm(x)
    x[::7] = 0.0
    assert same(rotation.rotate(x, key), reference.rotate(x, key)), dim
    kw = dict(clip=1.0, gamma=50.0, beta=0.5, rotation_key=key)
    got = encoding.encode_update(x, **kw, rounding=KeyStream(key, Purpose.DP_ROUNDING))
    want = reference.encode_update(
        x, **kw, rounding=reference.ReferenceKeyStream(key, Purpose.DP_ROUNDING))
    assert same(got, want), dim
    ring = encoding.to_ring(got, 20)
    w = -(-ring.size // 2)
    assert same(pack_ring(ring, 26, w), reference.pack_ring(ring, 26, w))
    dkw = dict(bits=20, gamma=50.0, rotation_key=key, dim=dim)
    assert same(encoding.decode_sum(ring, **dkw), reference.decode_sum(ring, **dkw)), dim
iv = np.arange(32, dtype=np.int64) * 3 - 40
assert same(rotation.fwht(iv), rotation.fwht_reference(iv))
print("ok")
"""


@pytest.mark.skipif(not _HAS_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_cuda_dp_encode_matches_reference_under_simulator() -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", SECAGG_KERNELS="cuda")
    res = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
