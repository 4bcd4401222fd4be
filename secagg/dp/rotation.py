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
from secagg.kernels.cpu import _LAUNCH
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


_BLOCK = 1 << 11
"""Butterfly stages ``h < _BLOCK`` run block by block (16 KiB of float64: in L1), the
later ones as radix-4 passes over the whole vector."""


@njit(cache=True, nogil=True, parallel=True)
def _fwht_kernel(v: Any) -> None:  # pragma: no cover - compiled
    """In place: the butterflies ``(a, b) -> (a + b, a - b)`` of every stage ``h = 1, 2, ..``.

    Each element goes through the stages in the same order with the same operands as in
    :func:`fwht_reference`, so float64 results are bit-identical and integer ones exact.
    """
    n = v.shape[0]
    if n < 2:
        return
    b = min(n, _BLOCK)
    for blk in prange(n // b):
        base = blk * b
        for j in range(base, base + b, 2):  # h = 1
            x = v[j]
            y = v[j + 1]
            v[j] = x + y
            v[j + 1] = x - y
        h = 2
        while h < b:
            for i in range(base, base + b, 2 * h):
                for j in range(i, i + h):
                    x = v[j]
                    y = v[j + h]
                    v[j] = x + y
                    v[j + h] = x - y
            h *= 2
    h = b
    while h < n:
        if 4 * h <= n:  # stages h and 2h together: the same four sums, one pass
            for g in prange(n // (4 * h)):
                for j in range(g * 4 * h, g * 4 * h + h):
                    a0, a1, a2, a3 = v[j], v[j + h], v[j + 2 * h], v[j + 3 * h]
                    s0, s1, s2, s3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
                    v[j] = s0 + s2
                    v[j + h] = s1 + s3
                    v[j + 2 * h] = s0 - s2
                    v[j + 3 * h] = s1 - s3
            h *= 4
        else:
            for g in prange(n // (2 * h)):
                for j in range(g * 2 * h, g * 2 * h + h):
                    x = v[j]
                    y = v[j + h]
                    v[j] = x + y
                    v[j + h] = x - y
            h *= 2


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
    kernel; other dtypes: :func:`fwht_reference`, copied back). Returns ``v``."""
    n = v.shape[0]
    if n & (n - 1) or n == 0:
        raise ConfigurationError(f"Hadamard length must be a power of two, got {n}")
    if v.ndim == 1 and v.dtype in (np.float64, np.int64) and v.flags.c_contiguous:
        with _LAUNCH:  # one parallel region at a time (kernels/cpu.py: workqueue layer)
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


def signed_fwht(v: F64, scale: float, scaled: bool, key: bytes) -> F64:
    """``H D pad(v * scale)`` (``H D pad(v)`` unless ``scaled``), *not* divided by
    ``sqrt(d')``: one fused pass (:func:`secagg.kernels.dp_encode.signed_pad`) into a fresh
    buffer, then the in-place FWHT. ``v`` is a contiguous 1-D float64 array."""
    from secagg.kernels.dp_encode import signed_pad

    n = padded_dim(v.shape[0])
    out = np.empty(n, dtype=np.float64)
    with _LAUNCH:  # one parallel region at a time (kernels/cpu.py: workqueue layer)
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
    from secagg.kernels.dp_encode import unsign_scale

    n = y.shape[0]
    if n != padded_dim(dim):
        raise ConfigurationError(f"rotated length {n} does not match dimension {dim}")
    fwht_inplace(y)
    out = np.empty(dim, dtype=np.float64)
    with _LAUNCH:
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
