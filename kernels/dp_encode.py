"""Numba CPU kernels of the DP client's encode and of the decode (docs/dp.md, "Speed").

Fused passes over the ``d'`` coordinates of :mod:`secagg.dp.encoding` and
:mod:`secagg.dp.rotation`, each doing *the same floating-point operations in the same order*
as the numpy formulation it replaces (:mod:`secagg.dp.reference`), so results are equal bit
for bit (the tests compare them on random inputs):

* :func:`signed_pad`: ``pad(x * s) * D`` (clip factor, zero padding, the keyed signs) in one
  pass; the signs are read as bits of the rotation keystream words (bit ``j % 64`` of word
  ``j // 64``, 1 meaning ``-1``), a multiplication by ``-1.0`` being a negation;
* :func:`round_norm`: ``z = (y / sqrt(d')) gamma`` (two roundings, as ``rotate(x) * gamma``),
  randomized rounding against 53-bit coins, and the exact-norm inputs (wrapping int64
  ``sum r^2`` and ``max |r|``) in one pass, with a flag for ``|z| >= 2^52``;
* :func:`unsign_scale`: ``(y * D) / sqrt(d')`` truncated to ``d`` (the end of ``unrotate``);
* :func:`pack_lanes`: lane-major packing of ring values into words (``packing.pack_ring``).

All are ``@njit(parallel=True)`` with ``prange`` over independent coordinates (reductions
only for the norm), with a CUDA twin in :mod:`secagg.kernels.dp_encode_cuda` (the norm
excepted) chosen by :func:`kernels`; callers launch them inside :func:`launch` (one
parallel region at a time, with the thread count of
:func:`secagg.kernels.config.dp_threads`). They trust their arguments (shapes, dtypes,
contiguity): the wrappers in :mod:`secagg.dp` check them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numba import njit, prange, uint64

from secagg.errors import KernelError
from secagg.kernels import config
from secagg.kernels.config import dp_threads
from secagg.kernels.cpu import launch as cpu_launch

__all__ = [
    "NORM_BLOCK",
    "launch",
    "pack_lanes",
    "round_norm",
    "signed_pad",
    "sum_squares",
    "unsign_scale",
]

NORM_BLOCK = 1 << 12
"""Elements per block of :func:`sum_squares` (part of its definition: the summation order)."""


def kernels() -> Any:
    """The module whose passes run (one dispatcher for the pair): this one (Numba CPU), or
    :mod:`secagg.kernels.dp_encode_cuda` when ``SECAGG_KERNELS=cuda`` (the DP encode takes
    host arrays, so ``auto`` means the CPU). Read on every call.

    Raises
    ------
    KernelError
        ``cuda`` forced without a device or the simulator, or ``SECAGG_KERNELS`` invalid.
    """
    if config.backend() != "cuda":
        return sys.modules[__name__]
    if not config.cuda_available():
        raise KernelError("SECAGG_KERNELS=cuda, but no CUDA device or simulator is available")
    from secagg.kernels import dp_encode_cuda

    return dp_encode_cuda


@contextmanager
def launch() -> Iterator[None]:
    """:func:`secagg.kernels.cpu.launch` with :func:`~secagg.kernels.config.dp_threads`
    threads: one parallel region at a time (Numba's ``workqueue`` layer aborts on
    concurrent launches), ``0`` meaning all, restored after."""
    with cpu_launch(dp_threads()):
        yield


_TWO53 = 9007199254740992.0  # 2^53: coins are the top 53 bits of a keystream word
_LIMIT = 4503599627370496.0  # 2^52: floor(z) and the 53-bit fraction are exact below it
_ONE = uint64(1)
_SIX = uint64(6)
_SIXTY_THREE = uint64(63)
_ELEVEN = uint64(11)


@njit(cache=True, nogil=True, parallel=True)
def sum_squares(v: Any, partial: Any) -> float:  # pragma: no cover - compiled
    """``sum v_j^2`` in a fixed order, whatever the thread count: block ``b`` of
    :data:`NORM_BLOCK` elements sums element ``b B + 8 i + l`` into lane ``l`` in order of
    ``i``, its lanes are added ``l = 0 .. 7``, the blocks in order ``b = 0, 1, ..``
    (``partial``: one slot a block). :func:`secagg.dp.reference.norm` is the numpy form."""
    n = v.shape[0]
    for b in prange(partial.shape[0]):
        start = b * NORM_BLOCK
        stop = min(n, start + NORM_BLOCK)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
        j = start
        while j + 8 <= stop:
            a0 += v[j] * v[j]
            a1 += v[j + 1] * v[j + 1]
            a2 += v[j + 2] * v[j + 2]
            a3 += v[j + 3] * v[j + 3]
            a4 += v[j + 4] * v[j + 4]
            a5 += v[j + 5] * v[j + 5]
            a6 += v[j + 6] * v[j + 6]
            a7 += v[j + 7] * v[j + 7]
            j += 8
        rest = stop - j  # the last block's tail: lanes 0 .. rest - 1
        if rest > 0:
            a0 += v[j] * v[j]
        if rest > 1:
            a1 += v[j + 1] * v[j + 1]
        if rest > 2:
            a2 += v[j + 2] * v[j + 2]
        if rest > 3:
            a3 += v[j + 3] * v[j + 3]
        if rest > 4:
            a4 += v[j + 4] * v[j + 4]
        if rest > 5:
            a5 += v[j + 5] * v[j + 5]
        if rest > 6:
            a6 += v[j + 6] * v[j + 6]
        partial[b] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7
    total = 0.0
    for b in range(partial.shape[0]):
        total += partial[b]
    return total


@njit(cache=True, nogil=True, parallel=True)
def signed_pad(
    x: Any, scale: float, scaled: bool, signs: Any, out: Any
) -> None:  # pragma: no cover
    """``out[j] = ±(x[j] * scale)`` for ``j < len(x)`` (``±x[j]`` unless ``scaled``), ``±0.0``
    beyond; the sign is ``-`` where bit ``j`` of ``signs`` is set."""
    n = out.shape[0]
    dim = x.shape[0]
    for j in prange(n):
        v = 0.0
        if j < dim:
            v = x[j]
            if scaled:
                v = v * scale
        ju = uint64(j)
        if (signs[ju >> _SIX] >> (ju & _SIXTY_THREE)) & _ONE:
            v = -v
        out[j] = v


@njit(cache=True, nogil=True, parallel=True)
def round_norm(
    y: Any, inv: float, gamma: float, coins: Any, out: Any
) -> tuple[int, int, bool]:  # pragma: no cover
    """``out = floor(z) + [coins >> 11 < frac53(z)]`` with ``z = (y * inv) * gamma``.

    Returns ``(sum out^2 mod 2^64 as int64, max |out|, any |z| >= 2^52)``; the caller trusts
    the sum only when ``max^2 * len < 2^63`` (then no partial sum wraps).
    """
    n = y.shape[0]
    total: Any = 0
    peak: Any = 0
    big = 0
    for i in prange(n):
        z = (y[i] * inv) * gamma
        if not abs(z) < _LIMIT:
            big += 1
            out[i] = 0
            continue
        low = np.floor(z)
        frac53 = uint64((z - low) * _TWO53)
        up = (coins[i] >> _ELEVEN) < frac53
        r = np.int64(low) + np.int64(up)
        out[i] = r
        total += r * r
        a = r if r >= 0 else -r
        peak = max(peak, a)
    return total, peak, big > 0


@njit(cache=True, nogil=True, parallel=True)
def unsign_scale(y: Any, signs: Any, inv: float, out: Any) -> None:  # pragma: no cover
    """``out[j] = (±y[j]) * inv`` for ``j < len(out)``; ``-`` where bit ``j`` of ``signs`` is 1."""
    for j in prange(out.shape[0]):
        v = y[j]
        ju = uint64(j)
        if (signs[ju >> _SIX] >> (ju & _SIXTY_THREE)) & _ONE:
            v = -v
        out[j] = v * inv


@njit(cache=True, nogil=True, parallel=True)
def pack_lanes(values: Any, lane_bits: int, out: Any) -> None:  # pragma: no cover
    """``out[w] = OR over lanes l of values[l W + w] << (l lane_bits)`` (``W = len(out)``;
    values past the end count as 0)."""
    words = out.shape[0]
    n = values.shape[0]
    per = 64 // lane_bits
    for w in prange(words):
        acc = uint64(0)
        for lane in range(per):
            j = lane * words + w
            if j < n:
                acc |= values[j] << uint64(lane * lane_bits)
        out[w] = acc
