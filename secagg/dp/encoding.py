"""Client-side DP encoding: clip, rotate, scale, conditionally round, reduce mod 2^b.

The pipeline of Kairouz, Liu, Steinke (ICML 2021), Algorithm 1 (distributed discrete
Gaussian), client side:

1. clip ``x`` to L2 norm ``c``;
2. rotate, ``z = H D x / sqrt(d')`` (:mod:`secagg.dp.rotation`);
3. scale by ``gamma`` and round each coordinate to one of its two neighbouring integers,
   up with probability equal to its fractional part (unbiased), redrawing the whole vector
   until ``||round(gamma z)||^2 <= Delta_2^2`` (*conditional* randomized rounding, KLS21
   section 4.1, whose bound :func:`rounded_norm_bound_sq` gives the L2 sensitivity);
4. add the integer noise (:mod:`secagg.dp.sampling`, :mod:`secagg.dp.xnoise`);
5. reduce mod ``2^b`` (modular clipping; :mod:`secagg.dp.lanes` chooses ``b``).

The server decodes a sum with :func:`decode_sum`: centre mod ``2^b``, divide by ``gamma``,
rotate back. Rounding coins come from a :class:`~secagg.dp.randomness.KeyStream` under
:data:`secagg.prg.Purpose.DP_ROUNDING`; each coordinate compares 53 keystream bits with the
53-bit fractional part, so its bias is below ``2^-53``. Privacy never rests on the rounding
coins: the sensitivity bound is enforced by the exact integer norm check.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from secagg.dp.randomness import KeyStream
from secagg.dp.rotation import (
    inv_sqrt,
    padded_dim,
    rotate,
    signed_fwht,
    unrotate,
    unrotate_owned,
)
from secagg.dp.scratch import borrow
from secagg.errors import ConfigurationError, InputError
from secagg.kernels.dp_encode import launch

__all__ = [
    "MAX_ROUNDING_ATTEMPTS",
    "clip_l2",
    "conditional_round",
    "decode_sum",
    "encode_update",
    "l2_norm",
    "rounded_norm_bound_sq",
    "to_ring",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]

MAX_ROUNDING_ATTEMPTS = 64
"""Conditional rounding redraws at most this many times; each attempt fails with probability
at most ``beta`` (KLS21, conditional randomized rounding), so with ``beta <= 1/2`` giving up
has probability ``<= 2^-64``. A client that gives up raises :class:`~secagg.errors.InputError`."""


def l2_norm(v: F64) -> float:
    """``||v||_2`` summed in a fixed order (:func:`secagg.kernels.dp_encode.sum_squares`;
    numpy form :func:`secagg.dp.reference.norm`): the same bits on every machine and thread
    count. ``v`` is a contiguous 1-D float64 array.

    Not BLAS: ``np.linalg.norm`` is OpenBLAS's threaded ``ddot``, whose result depends on its
    thread count and whose idle workers then spin for a core's worth of CPU for milliseconds
    after every call (docs/dp.md, "Speed")."""
    from secagg.kernels.dp_encode import NORM_BLOCK, sum_squares

    partial = np.empty(-(-v.shape[0] // NORM_BLOCK), dtype=np.float64)
    with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
        return math.sqrt(sum_squares(v, partial))


def _checked_norm(v: F64) -> float:
    """:func:`l2_norm`; :class:`InputError` on a NaN or infinity.

    A NaN or infinite element makes the norm NaN or infinite, so the elementwise check runs
    only then (a finite vector whose squares overflow passes it, as before)."""
    if v.ndim != 1:
        v = np.ascontiguousarray(v).reshape(-1)
    norm = l2_norm(np.ascontiguousarray(v))
    if not math.isfinite(norm) and not np.all(np.isfinite(v)):
        raise InputError("update contains a NaN or infinity")
    return norm


def clip_l2(x: npt.ArrayLike, clip: float) -> F64:
    """``x * min(1, clip / ||x||_2)``: the client's update with L2 norm at most ``clip``."""
    v = np.asarray(x, dtype=np.float64)
    norm = _checked_norm(v)
    if not clip > 0:
        raise ConfigurationError(f"clip norm must be positive, got {clip}")
    return v * (clip / norm) if norm > clip else v.copy()


def rounded_norm_bound_sq(clip: float, gamma: float, dim: int, beta: float) -> int:
    """Squared L2 bound ``Delta_2^2`` enforced after conditional randomized rounding (KLS21).

    ``Delta_2^2 = min(c^2 g^2 + d/4 + sqrt(2 ln(1/beta)) (c g + sqrt(d)/2), (c g + sqrt(d))^2)``
    (Kairouz, Liu, Steinke 2021, conditional randomized rounding), rounded down to an integer
    because the rounded vector is integral; ``d`` is the rotated (padded) dimension and
    ``beta`` the chance that one rounding attempt exceeds the first term.
    """
    if not (clip > 0 and gamma > 0 and dim > 0 and 0 < beta < 1):
        raise ConfigurationError("rounding bound needs clip, gamma, dim > 0 and beta in (0, 1)")
    cg = clip * gamma
    first = cg * cg + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (cg + math.sqrt(dim) / 2)
    second = (cg + math.sqrt(dim)) ** 2
    return math.floor(min(first, second))


def _norm_sq(r: I64) -> int:
    """Exact ``||r||_2^2``: int64 when it cannot overflow, Python integers otherwise."""
    peak = int(np.abs(r).max(initial=0))
    if peak * peak * r.size < 1 << 63:
        return int(np.dot(r, r))
    return sum(int(v) * int(v) for v in r.tolist())


def _round_until(
    y: F64, inv: float, gamma: float, bound_sq: int, src: KeyStream, coins: U64
) -> I64:
    """Conditional rounding of ``z = (y * inv) * gamma`` (one fused pass an attempt:
    :func:`secagg.kernels.dp_encode.round_norm`; ``coins``: a scratch ``uint64`` vector of
    ``y``'s length), the exact norm check in int64 where no partial sum can wrap and in
    Python integers otherwise."""
    from secagg.kernels.dp_encode import kernels

    round_norm = kernels().round_norm
    r = np.empty(y.size, dtype=np.int64)
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        src.words_into(coins)
        with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
            total, peak, big = round_norm(y, inv, gamma, coins, r)
        if big:
            raise InputError("scaled coordinate too large to round exactly (>= 2^52)")
        norm = int(total) if int(peak) ** 2 * r.size < 1 << 63 else _norm_sq(r)
        if norm <= bound_sq:
            return r
    raise InputError(
        f"conditional rounding exceeded ||r||^2 <= {bound_sq} {MAX_ROUNDING_ATTEMPTS} times"
    )


def conditional_round(z: F64, bound_sq: int, src: KeyStream) -> I64:
    """Unbiased randomized rounding of ``z``, redrawn until ``||r||_2^2 <= bound_sq`` (exact).

    Raises
    ------
    InputError
        If :data:`MAX_ROUNDING_ATTEMPTS` attempts all exceed the bound (probability
        ``<= beta^64`` for a clipped input), or a coordinate is ``>= 2^52`` in magnitude.
    """
    z = np.ascontiguousarray(z, dtype=np.float64).reshape(-1)
    with borrow(np.uint64, z.size) as coins:
        return _round_until(z, 1.0, 1.0, bound_sq, src, coins)


def encode_update(
    x: npt.ArrayLike,
    *,
    clip: float,
    gamma: float,
    beta: float,
    rotation_key: bytes,
    rounding: KeyStream,
) -> I64:
    """Steps 1-3 of the pipeline: the integer vector (length ``d'``) a client adds noise to.

    Bit for bit :func:`secagg.dp.reference.encode_update` (``round(rotate(clip(x)) *
    gamma)``) in three passes over ``d'``: the norm (fixed order), clip factor + padding + signs
    (one Numba pass), the FWHT in place, then ``/ sqrt(d')``, ``* gamma``, the rounding and
    the norm of the result in one Numba pass per attempt.
    """
    v = np.ascontiguousarray(x, dtype=np.float64)
    if v.ndim != 1:
        return _encode_update_numpy(v, clip, gamma, beta, rotation_key, rounding)
    norm = _checked_norm(v)
    if not clip > 0:
        raise ConfigurationError(f"clip norm must be positive, got {clip}")
    scaled = norm > clip
    n = padded_dim(v.shape[0])
    with borrow(np.float64, n) as y, borrow(np.uint64, n) as coins:
        signed_fwht(v, clip / norm if scaled else 1.0, scaled, rotation_key, y)
        bound = rounded_norm_bound_sq(clip, gamma, n, beta)
        if math.isqrt(bound) + 1 >= 1 << 31:
            raise ConfigurationError("Delta_2 too large for exact int64 norm checks (>= 2^31)")
        return _round_until(y, inv_sqrt(n), float(gamma), bound, rounding, coins)


def _encode_update_numpy(
    v: F64, clip: float, gamma: float, beta: float, key: bytes, src: KeyStream
) -> I64:
    """The unfused formulation (inputs that are not one flat vector take it)."""
    z = rotate(clip_l2(v, clip), key) * gamma
    bound = rounded_norm_bound_sq(clip, gamma, z.size, beta)
    if math.isqrt(bound) + 1 >= 1 << 31:
        raise ConfigurationError("Delta_2 too large for exact int64 norm checks (>= 2^31)")
    return conditional_round(z, bound, src)


def to_ring(v: I64, bits: int) -> U64:
    """Modular clipping: ``v mod 2^bits`` as ``uint64`` (two's complement, then masked; one
    pass into a fresh array)."""
    if not 1 <= bits <= 64:
        raise ConfigurationError(f"ring width must be 1..64 bits, got {bits}")
    u = np.asarray(v, dtype=np.int64).view(np.uint64)
    return u.copy() if bits == 64 else np.bitwise_and(u, np.uint64((1 << bits) - 1))


def centre(v: U64, bits: int) -> I64:
    """Map ``v mod 2^bits`` to its representative in ``[-2^(bits-1), 2^(bits-1))``."""
    u = np.asarray(v, dtype=np.uint64)
    if bits < 64:
        u = u & np.uint64((1 << bits) - 1)
        half = np.uint64(1 << (bits - 1))
        signed = u.astype(np.int64)
        return np.where(u >= half, signed - np.int64(1 << bits), signed)
    return u.astype(np.int64)


@njit(cache=True, nogil=True, parallel=True)
def _centre_scale_kernel(
    u: Any, mask: Any, half: Any, full: Any, gamma: float, out: Any
) -> None:  # pragma: no cover - compiled
    """``out = float64(centre(u)) / gamma`` in one pass (the numpy formula's operations)."""
    for i in prange(u.shape[0]):
        v = u[i] & mask
        s = np.int64(v)
        if v >= half:
            s -= full
        out[i] = np.float64(s) / gamma


def centre_scaled(v: U64, bits: int, gamma: float, out: F64 | None = None) -> F64:
    """``centre(v, bits).astype(float64) / gamma``, bit for bit (a fused Numba pass for
    ``bits <= 62``), into ``out`` if given (a contiguous float64 array of ``v``'s size)."""
    u = np.ascontiguousarray(v, dtype=np.uint64)
    if out is not None and (
        out.shape != u.shape or out.dtype != np.float64 or not out.flags.c_contiguous
    ):
        raise ConfigurationError(f"decode buffer must be {u.shape} contiguous float64 values")
    if not 1 <= bits <= 62:
        res = centre(u, bits).astype(np.float64) / gamma
        if out is None:
            return res
        out[...] = res
        return out
    if out is None:
        out = np.empty(u.size, dtype=np.float64)
    mask, half = np.uint64((1 << bits) - 1), np.uint64(1 << (bits - 1))
    with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
        _centre_scale_kernel(u, mask, half, np.int64(1 << bits), float(gamma), out)
    return out


def decode_sum(total: U64, *, bits: int, gamma: float, rotation_key: bytes, dim: int) -> F64:
    """Server side: the released (noisy) sum of the clipped updates in the original basis.

    Bit for bit :func:`secagg.dp.reference.decode_sum`: centre and scale in one pass into a
    scratch buffer (:mod:`secagg.dp.scratch`), the FWHT in place on it, signs and
    ``1 / sqrt(d')`` in one pass into the result.
    """
    u = np.asarray(total)
    if u.ndim != 1:
        return unrotate(centre_scaled(u, bits, gamma), rotation_key, dim)
    with borrow(np.float64, u.size) as buf:
        return unrotate_owned(centre_scaled(u, bits, gamma, buf), rotation_key, dim)
