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

from typing import TypeVar

import numpy as np
import numpy.typing as npt

from secagg.dp.randomness import KeyStream
from secagg.errors import ConfigurationError
from secagg.prg import Purpose

__all__ = ["fwht", "padded_dim", "rotate", "sign_vector", "unrotate"]

F64 = npt.NDArray[np.float64]
_T = TypeVar("_T", bound=np.generic)


def padded_dim(dim: int) -> int:
    """The rotation's dimension: the least power of two ``>= dim``."""
    if dim < 1:
        raise ConfigurationError(f"vector dimension must be positive, got {dim}")
    return 1 << (dim - 1).bit_length()


def fwht(v: npt.NDArray[_T]) -> npt.NDArray[_T]:
    """Unnormalised fast Walsh-Hadamard transform ``H v`` of a power-of-two length vector.

    ``O(d log d)`` butterflies in numpy; exact for integer dtypes (as long as ``d' * max|v|``
    fits the dtype).
    """
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


def sign_vector(key: bytes, dim: int) -> F64:
    """The ``+-1`` diagonal of ``D`` for a padded dimension ``dim`` (a power of two)."""
    words = KeyStream(key, Purpose.DP_ROTATION).words((dim + 63) // 64)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:dim]
    return 1.0 - 2.0 * bits.astype(np.float64)


def rotate(x: npt.ArrayLike, key: bytes) -> F64:
    """``H D pad(x) / sqrt(d')``: an orthogonal map, so L2 norms are preserved."""
    v = np.asarray(x, dtype=np.float64)
    n = padded_dim(v.shape[0])
    padded = np.zeros(n, dtype=np.float64)
    padded[: v.shape[0]] = v
    out = fwht(padded * sign_vector(key, n))
    out *= 1.0 / np.sqrt(n)
    return out


def unrotate(y: npt.ArrayLike, key: bytes, dim: int) -> F64:
    """Inverse of :func:`rotate`: ``D H y / sqrt(d')`` truncated to the first ``dim`` entries."""
    v = np.asarray(y, dtype=np.float64)
    n = v.shape[0]
    if n != padded_dim(dim):
        raise ConfigurationError(f"rotated length {n} does not match dimension {dim}")
    out = fwht(v) * sign_vector(key, n)
    out *= 1.0 / np.sqrt(n)
    return out[:dim]
