"""Randomized Hadamard rotation ``x -> H D x / sqrt(d)`` with a keyed sign vector, and its inverse.

Kairouz, Liu, Steinke (ICML 2021), section 4.1: rotating by a random sign flip ``D`` followed
by the Walsh-Hadamard matrix ``H`` (entries +-1, ``H H = d I``) makes every coordinate of the
rotated vector sub-Gaussian with variance proxy ``||x||^2 / d`` (Hoeffding over the signs),
so that modular clipping of the sum almost never wraps. All clients of a round use the same
signs (the server rotates the sum back), drawn from the ChaCha20 stream of a 32-byte key under
:data:`secagg.prg.Purpose.DP_ROTATION`: one keystream bit per coordinate, bit ``j % 64`` of
word ``j // 64``, 1 meaning ``-1``.

Inputs are zero-padded to the next power of two ``d' >= d``. The transform itself
(:func:`fwht`) is exact on integer arrays: ``fwht(fwht(v)) == d' * v``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from secagg.dp.randomness import KeyStream
from secagg.errors import ConfigurationError
from secagg.kernels.dp_encode import launch
from secagg.prg import Purpose

__all__ = [
    "fwht",
    "fwht_inplace",
    "fwht_reference",
    "inv_sqrt",
    "padded_dim",
    "rotate",
    "sign_vector",
    "sign_words",
    "signed_fwht",
    "unrotate",
    "unrotate_owned",
]

F64 = npt.NDArray[np.float64]
_T = TypeVar("_T", bound=np.generic)


def padded_dim(dim: int) -> int:
    """The rotation's dimension: the least power of two ``>= dim``."""
    if dim < 1:
        raise ConfigurationError(f"vector dimension must be positive, got {dim}")
    return 1 << (dim - 1).bit_length()


_L1_BLOCK = 1 << 11
"""Stages ``h < _L1_BLOCK`` run sub-block by sub-block (16 KiB of float64: in L1)."""

_L2_BLOCK = 1 << 15
"""Stages ``h < _L2_BLOCK`` run block by block (256 KiB: in L2); the later ``log2(d' /
_L2_BLOCK)`` stages run on tiles of whole columns of the ``(d' / _L2_BLOCK) x _L2_BLOCK``
matrix (:data:`_TILE` elements), all of them per tile: two passes over the vector in all,
against one per two stages for whole-vector radix-4 passes."""

_TILE = 1 << 13
"""Elements of one column tile of the late stages (64 KiB), at least 8 columns wide."""


@njit(cache=True, nogil=True, inline="always")
def _butterfly_stages(
    v: Any, base: int, size: int, h: int, stride: int, width: int
) -> None:  # pragma: no cover
    """Stages ``h, 2h, ..`` below ``size`` of the rows ``base + k stride`` (``k < size``),
    each row ``width`` contiguous elements: radix-4 (two stages, the same four sums) while
    two stages remain, radix-2 for a last odd one."""
    while h < size:
        if 4 * h <= size:
            for g in range(0, size, 4 * h):
                for k in range(g, g + h):
                    r0 = base + k * stride
                    r1 = r0 + h * stride
                    r2 = r1 + h * stride
                    r3 = r2 + h * stride
                    for c in range(width):
                        a0, a1, a2, a3 = v[r0 + c], v[r1 + c], v[r2 + c], v[r3 + c]
                        s0, s1, s2, s3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
                        v[r0 + c] = s0 + s2
                        v[r1 + c] = s1 + s3
                        v[r2 + c] = s0 - s2
                        v[r3 + c] = s1 - s3
            h *= 4
        else:
            for g in range(0, size, 2 * h):
                for k in range(g, g + h):
                    r0 = base + k * stride
                    r1 = r0 + h * stride
                    for c in range(width):
                        x = v[r0 + c]
                        y = v[r1 + c]
                        v[r0 + c] = x + y
                        v[r1 + c] = x - y
            h *= 2


@njit(cache=True, nogil=True, inline="always")
def _wht8(v: Any, base: int, size: int) -> None:  # pragma: no cover - compiled
    """Stages ``h = 1, 2, 4`` of ``v[base : base + size]`` in registers, 8 elements at a time
    (the butterflies of :func:`fwht_reference`, in its stage order)."""
    for j in range(base, base + size, 8):
        a0, a1, a2, a3 = v[j], v[j + 1], v[j + 2], v[j + 3]
        a4, a5, a6, a7 = v[j + 4], v[j + 5], v[j + 6], v[j + 7]
        b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3  # h = 1
        b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
        c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3  # h = 2
        c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
        v[j], v[j + 4] = c0 + c4, c0 - c4  # h = 4
        v[j + 1], v[j + 5] = c1 + c5, c1 - c5
        v[j + 2], v[j + 6] = c2 + c6, c2 - c6
        v[j + 3], v[j + 7] = c3 + c7, c3 - c7


@njit(cache=True, nogil=True, parallel=True)
def _fwht_kernel(v: Any) -> None:  # pragma: no cover - compiled
    """In place: the butterflies ``(a, b) -> (a + b, a - b)`` of every stage ``h = 1, 2, ..``.

    Each element goes through the stages in the same order with the same operands as in
    :func:`fwht_reference` (only the order *between* independent butterflies changes), so
    float64 results are bit-identical and integer ones exact. Stages below
    :data:`_L2_BLOCK` run per block (those below :data:`_L1_BLOCK` per sub-block), the rest
    per column tile: the vector is read and written twice.
    """
    n = v.shape[0]
    if n < 2:
        return
    b2 = min(n, _L2_BLOCK)
    b1 = min(n, _L1_BLOCK)
    for blk in prange(n // b2):
        base = blk * b2
        for sub in range(b2 // b1):
            if b1 >= 8:
                _wht8(v, base + sub * b1, b1)
                _butterfly_stages(v, base + sub * b1, b1, 8, 1, 1)
            else:
                _butterfly_stages(v, base + sub * b1, b1, 1, 1, 1)
        _butterfly_stages(v, base, b2 // b1, 1, b1, b1)  # stages b1 .. b2/2 as rows of b1
    rows = n // b2
    if rows > 1:
        width = max(8, min(b2, _TILE // rows))
        for t in prange(b2 // width):
            _butterfly_stages(v, t * width, rows, 1, b2, width)


def fwht_reference(v: npt.NDArray[_T]) -> npt.NDArray[_T]:
    """Unnormalised fast Walsh-Hadamard transform in numpy, stage by stage (the
    obviously-right reference of :func:`fwht`; any dtype)."""
    n = v.shape[0]
    if n & (n - 1) or n == 0:
        raise ConfigurationError(f"Hadamard length must be a power of two, got {n}")
    out = np.array(v, copy=True)
    h = 1
    while h < n:
        blocks = out.reshape(-1, 2, h)
        a = blocks[:, 0, :].copy()
        blocks[:, 0, :] += blocks[:, 1, :]
        blocks[:, 1, :] = a - blocks[:, 1, :]
        h *= 2
    return out


def fwht_inplace(v: npt.NDArray[_T]) -> npt.NDArray[_T]:
    """:func:`fwht` overwriting ``v`` (contiguous float64 or int64: the parallel Numba
    kernel, or its CUDA twin under ``SECAGG_KERNELS=cuda``; other dtypes:
    :func:`fwht_reference`, copied back). Returns ``v``."""
    from secagg.kernels.dp_encode import kernels

    n = v.shape[0]
    if n & (n - 1) or n == 0:
        raise ConfigurationError(f"Hadamard length must be a power of two, got {n}")
    if v.ndim == 1 and v.dtype in (np.float64, np.int64) and v.flags.c_contiguous:
        k = kernels()
        with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
            if hasattr(k, "fwht_inplace"):
                k.fwht_inplace(v)  # the CUDA twin
            else:
                _fwht_kernel(v)
    else:
        v[...] = fwht_reference(v)
    return v


def fwht(v: npt.NDArray[_T]) -> npt.NDArray[_T]:
    """Unnormalised fast Walsh-Hadamard transform ``H v`` of a power-of-two length vector.

    ``O(d log d)`` butterflies (a parallel Numba kernel, bit-identical to
    :func:`fwht_reference`); exact for integer dtypes (as long as ``d' * max|v|`` fits the
    dtype).
    """
    return fwht_inplace(np.array(v, copy=True))


def sign_words(key: bytes, dim: int) -> npt.NDArray[np.uint64]:
    """The signs of ``D`` as bits: bit ``j % 64`` of word ``j // 64`` is 1 where ``D_jj = -1``
    (``ceil(dim / 64)`` words of the ``DP_ROTATION`` keystream)."""
    return KeyStream(key, Purpose.DP_ROTATION).words((dim + 63) // 64)


def sign_vector(key: bytes, dim: int) -> F64:
    """The ``+-1`` diagonal of ``D`` for a padded dimension ``dim`` (a power of two)."""
    words = sign_words(key, dim)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:dim]
    return 1.0 - 2.0 * bits.astype(np.float64)


def inv_sqrt(n: int) -> float:
    """``1 / sqrt(d')`` exactly as the numpy formulation computes it (one float64 division)."""
    return float(1.0 / np.sqrt(n))


def signed_fwht(v: F64, scale: float, scaled: bool, key: bytes, out: F64 | None = None) -> F64:
    """``H D pad(v * scale)`` (``H D pad(v)`` unless ``scaled``), *not* divided by
    ``sqrt(d')``: one fused pass (:func:`secagg.kernels.dp_encode.signed_pad`) into ``out``
    (a contiguous float64 array of length ``d'``; default a fresh one), then the in-place
    FWHT. ``v`` is a contiguous 1-D float64 array."""
    from secagg.kernels.dp_encode import kernels

    signed_pad = kernels().signed_pad

    n = padded_dim(v.shape[0])
    if out is None:
        out = np.empty(n, dtype=np.float64)
    if out.shape != (n,) or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ConfigurationError(f"rotation buffer must be {n} contiguous float64 values")
    with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
        signed_pad(v, float(scale), bool(scaled), sign_words(key, n), out)
    return fwht_inplace(out)


def rotate(x: npt.ArrayLike, key: bytes) -> F64:
    """``H D pad(x) / sqrt(d')``: an orthogonal map, so L2 norms are preserved.

    Bit for bit :func:`secagg.dp.reference.rotate` (signs and padding in one pass).
    """
    v = np.ascontiguousarray(x, dtype=np.float64)
    if v.ndim != 1:
        from secagg.dp import reference

        return reference.rotate(v, key)
    out = signed_fwht(v, 1.0, False, key)
    out *= inv_sqrt(out.shape[0])
    return out


def unrotate_owned(y: F64, key: bytes, dim: int) -> F64:
    """:func:`unrotate` that may overwrite ``y`` (a contiguous 1-D float64 array the caller
    owns): FWHT in place, then signs and ``1 / sqrt(d')`` in one pass into the ``dim`` output."""
    from secagg.kernels.dp_encode import kernels

    unsign_scale = kernels().unsign_scale

    n = y.shape[0]
    if n != padded_dim(dim):
        raise ConfigurationError(f"rotated length {n} does not match dimension {dim}")
    fwht_inplace(y)
    out = np.empty(dim, dtype=np.float64)
    with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
        unsign_scale(y, sign_words(key, n), inv_sqrt(n), out)
    return out


def unrotate(y: npt.ArrayLike, key: bytes, dim: int) -> F64:
    """Inverse of :func:`rotate`: ``D H y / sqrt(d')`` truncated to the first ``dim`` entries.

    Bit for bit :func:`secagg.dp.reference.unrotate`.
    """
    v = np.asarray(y, dtype=np.float64)
    if v.ndim != 1:
        from secagg.dp import reference

        return reference.unrotate(v, key, dim)
    return unrotate_owned(np.array(v, dtype=np.float64, copy=True), key, dim)
