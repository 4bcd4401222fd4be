"""CUDA twin of :mod:`secagg.kernels.dp_noise`: one thread per (vector, chunk of coordinates).

Same chunked streams, same algorithm: the sampler helpers of :mod:`secagg.kernels.dp_noise`
are compiled here a second time as device functions from the very same source (a copy of each
function object with its own globals, in which the keystream refill is the scalar block
function, one 64-byte block at a time, instead of the CPU's 16-lane SIMD loop), so the output
is bit for bit the CPU kernel's and the reference's; flagged chunks are recomputed on the host.
Work buffers live in thread-local memory; the grid is grid-stride over ``rows x chunks``.

Only import this module when CUDA is wanted: it imports ``numba.cuda``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import cuda as _numba_cuda
from numba import uint32, uint64
from numba.extending import register_jitable

from secagg.kernels import dp_noise as _cpu
from secagg.kernels.chacha import chacha20_block, key_words
from secagg.kernels.config import CUDA_THREADS

__all__ = ["ROWS_PER_LAUNCH", "discrete_gaussian", "discrete_gaussian_sum"]

cuda: Any = _numba_cuda  # numba-cuda's kernel-side API is dynamic; mypy sees it as Any

ROWS_PER_LAUNCH = 64
"""Vectors sampled per launch (bounds the device buffer: 64 x 2^20 int64 = 512 MiB)."""

_ONE = uint64(1)
_ZERO = uint64(0)


def _refill_one_block(keys: Any, nonces: Any, buf: Any, st: Any) -> None:
    """The chunk's next block into ``buf[:16]`` (``st`` as :mod:`secagg.kernels.dp_noise`)."""
    if st[0] > _cpu._LAST_BLOCK:
        st[2] = _ONE
        return
    w = chacha20_block(keys, 0, uint32(st[0]), nonces)
    for j in range(16):
        buf[j] = w[j]
    st[0] += _ONE
    st[1] = _ZERO


def _device_twins() -> dict[str, Any]:
    """The CPU module's sampler helpers, re-registered against a globals dict of their own."""
    g: dict[str, Any] = dict(vars(_cpu))
    g["_refill"] = register_jitable(_refill_one_block)
    for name in ("_word", "_mul128", "_below", "_series", "_bernoulli_exp", "_laplace",
                 "_sample", "_set_nonce"):  # fmt: skip
        fn = getattr(_cpu, name)
        g[name] = register_jitable(types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__))
    return g


_DEV = _device_twins()
_sample = _DEV["_sample"]
_set_nonce = _DEV["_set_nonce"]
_C = _cpu.COORDS_PER_STREAM


def _kernel(fn: Callable[..., None]) -> Any:
    """``@cuda.jit``, typed for mypy (numba-cuda has no annotations)."""
    return cuda.jit(fn)


@_kernel
def _dg_cuda(key: Any, tag: Any, params: Any, count: Any, out: Any, flags: Any) -> None:
    keys = cuda.local.array((1, 8), uint32)
    nonces = cuda.local.array((1, 3), uint32)
    buf = cuda.local.array(16, uint32)
    st = cuda.local.array(4, uint64)
    n_chunks = flags.shape[1]
    idx = cuda.grid(1)
    stride = cuda.gridsize(1)
    while idx < key.shape[0] * n_chunks:
        r = idx // n_chunks
        c = idx - r * n_chunks
        for w in range(8):
            keys[0, w] = key[r, w]
        _set_nonce(nonces, tag, c)
        st[0] = _ZERO
        st[1] = uint64(16)
        st[2] = _ZERO
        st[3] = uint64(16)
        lo = c * _C
        hi = min(count, lo + _C)
        for i in range(lo, hi):
            out[r, i] = _sample(
                keys, nonces, buf, st, params[r, 0], params[r, 1], params[r, 2], params[r, 3],
                params[r, 4],
            )  # fmt: skip
            if st[2] != _ZERO:
                flags[r, c] = True
                break
        idx += stride


def discrete_gaussian_sum(
    keys: npt.NDArray[np.uint32],
    tag: int,
    sigma2s: npt.ArrayLike,
    count: int,
    *,
    blocks: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """As :func:`secagg.kernels.dp_noise.discrete_gaussian_sum`, on the GPU.

    Rows go :data:`ROWS_PER_LAUNCH` at a time; each launch writes one output row per vector,
    flagged chunks are zeroed on the host (the caller adds the reference) and rows summed.
    """
    params = _cpu.sampler_params(sigma2s)
    n_chunks = -(-count // _C)
    m = keys.shape[0]
    total = np.zeros(count, dtype=np.int64)
    flags = np.zeros((m, n_chunks), dtype=np.bool_)
    for r0 in range(0, m if count else 0, ROWS_PER_LAUNCH):
        r1 = min(m, r0 + ROWS_PER_LAUNCH)
        out = cuda.device_array((r1 - r0, count), dtype=np.int64)
        fl = cuda.to_device(np.zeros((r1 - r0, n_chunks), dtype=np.bool_))
        items = (r1 - r0) * n_chunks
        grid = blocks if blocks is not None else max(1, min(65_535, -(-items // CUDA_THREADS)))
        _dg_cuda[grid, CUDA_THREADS](
            cuda.to_device(np.ascontiguousarray(keys[r0:r1])), np.uint64(tag),
            cuda.to_device(params[r0:r1]), np.int64(count), out, fl,
        )  # fmt: skip
        rows = out.copy_to_host()
        f = fl.copy_to_host()
        for r, c in zip(*np.nonzero(f), strict=True):
            rows[r, c * _C : (c + 1) * _C] = 0
        total += rows.sum(axis=0)
        flags[r0:r1] = f
    return total, flags


def discrete_gaussian(
    key: bytes, tag: int, sigma2: int, count: int, *, blocks: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """One vector on the GPU (flags of shape ``(1, chunks)``)."""
    return discrete_gaussian_sum(key_words(key).reshape(1, 8), tag, [sigma2], count, blocks=blocks)
