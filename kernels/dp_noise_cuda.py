"""CUDA twin of :mod:`secagg.kernels.dp_noise`: one thread per noise coordinate.

Same per-coordinate streams, same algorithm (the ``register_jitable`` helpers of
:mod:`secagg.kernels.dp_noise` compile as device functions here), so the output is bit for
bit the CPU kernel's and the reference's; flagged coordinates are recomputed on the host.
Work buffers live in thread-local memory; the grid is grid-stride.

Only import this module when CUDA is wanted: it imports ``numba.cuda``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import cuda as _numba_cuda
from numba import int64, uint32, uint64

from secagg.kernels.chacha import key_words
from secagg.kernels.config import CUDA_THREADS
from secagg.kernels.dp_noise import _ZERO, _sample

__all__ = ["discrete_gaussian"]

cuda: Any = _numba_cuda  # numba-cuda's kernel-side API is dynamic; mypy sees it as Any


def _kernel(fn: Callable[..., None]) -> Any:
    """``@cuda.jit``, typed for mypy (numba-cuda has no annotations)."""
    return cuda.jit(fn)


@_kernel
def _dg_cuda(
    key: Any, tag: Any, p: Any, q: Any, t: Any, den: Any, amax: Any, out: Any, flags: Any
) -> None:
    keys = cuda.local.array((1, 8), uint32)
    nonces = cuda.local.array((1, 3), uint32)
    buf = cuda.local.array(8, uint64)
    st = cuda.local.array(3, uint64)
    for k in range(8):
        keys[0, k] = key[k]
    tq = int64(t * q)
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.shape[0]:
        out[i] = _sample(i, keys, nonces, buf, st, tag, p, tq, t, den, amax)
        flags[i] = st[2] != _ZERO
        i += stride


def discrete_gaussian(
    key: bytes, tag: int, sigma2: int, count: int, *, blocks: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """As :func:`secagg.kernels.dp_noise.discrete_gaussian`, on the GPU."""
    t = math.isqrt(sigma2) + 1
    den = 2 * sigma2 * t * t
    amax = ((1 << 62) - sigma2) // t
    out = cuda.device_array(count, dtype=np.int64)
    flags = cuda.device_array(count, dtype=np.bool_)
    grid = blocks if blocks is not None else max(1, min(65_535, -(-count // CUDA_THREADS)))
    _dg_cuda[grid, CUDA_THREADS](
        cuda.to_device(key_words(key)),
        np.uint64(tag), np.uint64(sigma2), np.uint64(1), np.uint64(t), np.uint64(den),
        np.int64(amax), out, flags,
    )  # fmt: skip
    return out.copy_to_host(), np.flatnonzero(flags.copy_to_host())
