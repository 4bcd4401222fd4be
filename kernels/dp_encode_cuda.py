"""CUDA twin of :mod:`secagg.kernels.dp_encode`: the DP encode/decode passes on a GPU.

Same signatures on host arrays as the CPU kernels (inputs copied to the device, outputs
copied back), chosen by :func:`secagg.kernels.dp_encode.kernels` when ``SECAGG_KERNELS=cuda``.
Each thread does one coordinate (grid-stride), with the CPU kernels' floating-point operations
in the same order; none has a multiply feeding an add, so no FMA contraction can change a bit.
The FWHT runs one launch per stage (each thread one butterfly), so each element sees the
stages in the reference's order. The norm of the clip stays on the host
(:func:`secagg.dp.encoding.l2_norm`): its sum of products is what a GPU compiler contracts
into FMAs. ``round_norm`` accumulates ``sum r^2`` with wrapping ``uint64`` atomics (integer
addition is associative, so the order of the atomics does not matter) and ``max |r|`` with
an atomic max.

Only import this module when CUDA is wanted: it imports ``numba.cuda``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import cuda as _numba_cuda
from numba import float64, int64, uint64

from secagg.kernels.config import CUDA_THREADS

__all__ = ["fwht_inplace", "pack_lanes", "round_norm", "signed_pad", "unsign_scale"]

cuda: Any = _numba_cuda  # numba-cuda's kernel-side API is dynamic; mypy sees it as Any

_TWO53 = 9007199254740992.0
_LIMIT = 4503599627370496.0
_ONE = uint64(1)
_SIX = uint64(6)
_SIXTY_THREE = uint64(63)
_ELEVEN = uint64(11)


def _kernel(fn: Callable[..., None]) -> Any:
    """``@cuda.jit``, typed for mypy (numba-cuda has no annotations)."""
    return cuda.jit(fn)


def _grid(n: int) -> int:
    return max(1, min(65_535, -(-n // CUDA_THREADS)))


@_kernel
def _signed_pad(x: Any, scale: Any, scaled: Any, signs: Any, out: Any) -> None:  # pragma: no cover
    n = out.shape[0]
    dim = x.shape[0]
    j = cuda.grid(1)
    while j < n:
        v = 0.0
        if j < dim:
            v = x[j]
            if scaled:
                v = v * scale
        ju = uint64(j)
        if (signs[ju >> _SIX] >> (ju & _SIXTY_THREE)) & _ONE:
            v = -v
        out[j] = v
        j += cuda.gridsize(1)


@_kernel
def _fwht_stage(v: Any, h: Any) -> None:  # pragma: no cover
    half = v.shape[0] // 2
    i = cuda.grid(1)
    while i < half:
        j = (i // h) * 2 * h + i % h
        x = v[j]
        y = v[j + h]
        v[j] = x + y
        v[j + h] = x - y
        i += cuda.gridsize(1)


@_kernel
def _round_norm(
    y: Any, inv: Any, gamma: Any, coins: Any, out: Any, acc: Any
) -> None:  # pragma: no cover
    i = cuda.grid(1)
    while i < y.shape[0]:
        z = (y[i] * inv) * gamma
        if not abs(z) < _LIMIT:
            cuda.atomic.add(acc, 2, _ONE)
            out[i] = 0
        else:
            low = int64(math.floor(z))
            frac53 = uint64((z - float64(low)) * _TWO53)
            up = (coins[i] >> _ELEVEN) < frac53
            r = low + int64(up)
            out[i] = r
            a = r if r >= 0 else -r
            cuda.atomic.add(acc, 0, uint64(a) * uint64(a))
            cuda.atomic.max(acc, 1, uint64(a))
        i += cuda.gridsize(1)


@_kernel
def _unsign_scale(y: Any, signs: Any, inv: Any, out: Any) -> None:  # pragma: no cover
    j = cuda.grid(1)
    while j < out.shape[0]:
        v = y[j]
        ju = uint64(j)
        if (signs[ju >> _SIX] >> (ju & _SIXTY_THREE)) & _ONE:
            v = -v
        out[j] = v * inv
        j += cuda.gridsize(1)


@_kernel
def _pack_lanes(values: Any, lane_bits: Any, out: Any) -> None:  # pragma: no cover
    words = out.shape[0]
    n = values.shape[0]
    per = 64 // lane_bits
    w = cuda.grid(1)
    while w < words:
        acc = uint64(0)
        for lane in range(per):
            j = lane * words + w
            if j < n:
                acc |= values[j] << uint64(lane * lane_bits)
        out[w] = acc
        w += cuda.gridsize(1)


def signed_pad(x: Any, scale: float, scaled: bool, signs: Any, out: Any) -> None:
    """:func:`secagg.kernels.dp_encode.signed_pad` on the GPU (host arrays in and out)."""
    d_out = cuda.device_array(out.shape[0], dtype=np.float64)
    _signed_pad[_grid(out.shape[0]), CUDA_THREADS](
        cuda.to_device(x), np.float64(scale), bool(scaled), cuda.to_device(signs), d_out
    )
    d_out.copy_to_host(out)


def fwht_inplace(v: Any) -> None:
    """The unnormalised FWHT of ``v`` (float64 or int64, length a power of two) in place."""
    n = v.shape[0]
    if n < 2:
        return
    d_v = cuda.to_device(v)
    h = 1
    while h < n:
        _fwht_stage[_grid(n // 2), CUDA_THREADS](d_v, np.int64(h))
        h *= 2
    d_v.copy_to_host(v)


def round_norm(y: Any, inv: float, gamma: float, coins: Any, out: Any) -> tuple[int, int, bool]:
    """:func:`secagg.kernels.dp_encode.round_norm` on the GPU: ``(sum r^2 mod 2^64 as a
    signed int64 value, max |r|, any |z| >= 2^52)``."""
    acc = cuda.to_device(np.zeros(3, dtype=np.uint64))
    d_out = cuda.device_array(y.shape[0], dtype=np.int64)
    _round_norm[_grid(y.shape[0]), CUDA_THREADS](
        cuda.to_device(y), np.float64(inv), np.float64(gamma), cuda.to_device(coins), d_out, acc
    )
    d_out.copy_to_host(out)
    total, peak, big = (int(a) for a in acc.copy_to_host())
    return total - (1 << 64) if total >= 1 << 63 else total, peak, big > 0


def unsign_scale(y: Any, signs: Any, inv: float, out: Any) -> None:
    """:func:`secagg.kernels.dp_encode.unsign_scale` on the GPU."""
    d_out = cuda.device_array(out.shape[0], dtype=np.float64)
    _unsign_scale[_grid(out.shape[0]), CUDA_THREADS](
        cuda.to_device(y), cuda.to_device(signs), np.float64(inv), d_out
    )
    d_out.copy_to_host(out)


def pack_lanes(values: Any, lane_bits: int, out: Any) -> None:
    """:func:`secagg.kernels.dp_encode.pack_lanes` on the GPU."""
    d_out = cuda.device_array(out.shape[0], dtype=np.uint64)
    _pack_lanes[_grid(out.shape[0]), CUDA_THREADS](
        cuda.to_device(values), np.int64(lane_bits), d_out
    )
    d_out.copy_to_host(out)
