"""Numba kernel for Shamir reconstruction: Lagrange denominators of many point sets.

A server reconstructing the secrets of ``m`` dropped or surviving clients in SecAgg+ faces
``m`` different holder sets (each client's neighbours), so no Lagrange basis is shared and
each costs ``t^2`` multiplications of a 257-bit field element by a point difference. Pure
Python does that at about 100 ns a product (~35 ms a set at t = 245); this kernel does it in
fixed-width limbs, all sets in parallel.

Representation: a field element of GF(p), ``p = 2^256 + 297`` (:mod:`secagg.shamir`), as
:data:`LIMBS` signed 64-bit limbs of :data:`LIMB_BITS` bits, least significant first, value
``sum(limb[k] << 26 k)``, not necessarily reduced below ``p`` (the caller reduces). Invariant
between products: limbs 0..8 in ``[0, 2^26)``, limb 9 in ``[0, 2^27)`` (value below
``2^260 + p``). A product by ``m < 2^32`` keeps every partial product below ``2^59``; its
overflow ``c`` above bit 260 (below ``2^33``) is folded with ``2^260 = 16 p - 4752``, i.e.
``value + p - 4752 c`` (non-negative since ``4752 c < 2^46 < p``), then carries are
propagated again. The kernel trusts its arguments; :func:`secagg.shamir` validates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit, prange

__all__ = ["LIMBS", "LIMB_BITS", "from_limbs", "scaled_derivatives"]

LIMB_BITS = 26
LIMBS = 10
_MASK = (1 << LIMB_BITS) - 1
_PRIME = 2**256 + 297
_FOLD = 16 * _PRIME - 2**260
"""``2^260 = 16 p - _FOLD``, so ``c 2^260 = -_FOLD c (mod p)``; _FOLD = 4752."""

_SMALL = 1 << 32
"""Multipliers of :func:`_mul_small` stay below this (partial products below 2^59)."""

_VALUE_BYTES = 33
"""Bytes of a value below ``2^260 + p < 2^264``."""

_P_LIMBS = np.array([(_PRIME >> (LIMB_BITS * k)) & _MASK for k in range(LIMBS)], dtype=np.int64)
assert sum(int(v) << (LIMB_BITS * k) for k, v in enumerate(_P_LIMBS)) == _PRIME


@njit(cache=True, inline="always")
def _mul_small(v: Any, m: Any, p_limbs: Any) -> None:
    """``v <- v * m (mod p)`` in place, ``0 < m < 2^32``, keeping the invariant above."""
    carry = np.int64(0)
    for k in range(LIMBS):
        t = v[k] * m + carry
        v[k] = t & _MASK
        carry = t >> LIMB_BITS
    # v = low + carry 2^260 == low + p - _FOLD carry (mod p), non-negative.
    for k in range(LIMBS):
        v[k] += p_limbs[k]
    v[0] -= _FOLD * carry
    for k in range(LIMBS - 1):
        t = v[k]
        v[k] = t & _MASK
        v[k + 1] += t >> LIMB_BITS  # arithmetic shift: floor, also for a borrow


@njit(cache=True, parallel=True)
def _scaled_derivatives_kernel(xs: Any, p_limbs: Any, out: Any, negative: Any) -> None:
    """``out[r, i] = |x_i prod_{j != i} (x_i - x_j)|`` for row ``r`` of ``xs`` (in limbs),
    and whether the true value is negative, for every row in parallel."""
    rows, t = xs.shape
    for r in prange(rows):
        for i in range(t):
            v = out[r, i]
            v[0] = 1
            for k in range(1, LIMBS):
                v[k] = 0
            xi = xs[r, i]
            m = xi  # factors multiply together while their product stays below 2^32
            flips = 0
            for j in range(t):
                if j != i:
                    d = xi - xs[r, j]
                    if d < 0:
                        d = -d
                        flips += 1
                    if d <= (_SMALL - 1) // m:  # m * d < 2^32 (no int64 overflow)
                        m *= d
                    else:
                        _mul_small(v, m, p_limbs)
                        m = d
            _mul_small(v, m, p_limbs)
            negative[r, i] = flips & 1


def scaled_derivatives(xs: npt.NDArray[np.int64]) -> list[list[int]]:
    """``x_i prod_{j != i} (x_i - x_j) mod p`` for each row of ``xs`` (distinct points in
    ``1 .. 2^32 - 1`` per row), as Python integers in ``[0, p)``."""
    rows, t = xs.shape
    out = np.zeros((rows, t, LIMBS), dtype=np.int64)
    negative = np.zeros((rows, t), dtype=np.int8)
    _scaled_derivatives_kernel(np.ascontiguousarray(xs, dtype=np.int64), _P_LIMBS, out, negative)
    values = from_limbs(out)
    flags = negative.tolist()
    return [
        [(_PRIME - v) % _PRIME if neg else v for v, neg in zip(row, frow, strict=True)]
        for row, frow in zip(values, flags, strict=True)
    ]


@njit(cache=True)
def _to_bytes_kernel(limbs: Any, out: Any) -> None:
    """Little-endian bytes of each limb vector (values below 2^261: 33 bytes each)."""
    for r in range(limbs.shape[0]):
        acc = np.int64(0)
        bits = 0
        pos = 0
        for k in range(LIMBS):
            acc |= limbs[r, k] << bits
            bits += LIMB_BITS
            while bits >= 8:
                out[r, pos] = acc & 0xFF
                acc >>= 8
                bits -= 8
                pos += 1
        while pos < out.shape[1]:
            out[r, pos] = acc & 0xFF
            acc >>= 8
            pos += 1


def from_limbs(limbs: npt.NDArray[np.int64]) -> list[list[int]]:
    """Python integers (reduced mod p) of a ``(rows, t, LIMBS)`` limb array."""
    rows, t, _ = limbs.shape
    flat = np.ascontiguousarray(limbs.reshape(-1, LIMBS))
    raw = np.zeros((flat.shape[0], _VALUE_BYTES), dtype=np.uint8)
    _to_bytes_kernel(flat, raw)
    data = raw.tobytes()
    ints = [
        int.from_bytes(data[i : i + _VALUE_BYTES], "little") % _PRIME
        for i in range(0, len(data), _VALUE_BYTES)
    ]
    return [ints[r * t : (r + 1) * t] for r in range(rows)]
