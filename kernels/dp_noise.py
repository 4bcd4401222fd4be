"""Numba CPU kernel: exact discrete Gaussian noise, one ChaCha20 stream per chunk of coordinates.

The layout and the algorithm are defined by :mod:`secagg.dp.streams` (its scalar reference,
with Python integers, is the specification; the tests compare the two bit for bit).
Coordinates ``c C .. c C + C - 1`` (``C =`` :data:`COORDS_PER_STREAM`) of a vector under key
``K`` are drawn, in order, from the keystream of ``K`` under nonce ``tag || LE88(c)`` read as
consecutive little-endian ``uint32`` words from block 0, every word used. Uniform integers
below ``m`` by Lemire's multiply-shift rejection (a division only when the low half of the
product falls below ``m``): one word for ``m < 2^32``, two (low first) for ``m < 2^63``.
CKS20 Algorithms 1-3 run in ``uint64`` arithmetic; where an integer would leave 64 bits
the kernel stops that (vector, chunk) and flags it; the caller recomputes flagged chunks
with the reference, so the output never depends on a tail bound.

One call samples a *batch* of vectors (``m`` keys, each with its own integer variance) and
returns their sum: the client's ``L + 1`` components, or every survivor's removable
components on the server, in one parallel pass (``prange`` over chunks; each task loops over
the batch and accumulates, so there is no race and no per-vector output).

The keystream of a chunk is produced :data:`REFILL_BLOCKS` blocks at a time by the
vectorised block loop of :mod:`secagg.kernels.cpu` (16 blocks in the lanes of one SIMD
loop); the words a chunk leaves unread are discarded, which does not change the output.

All ``uint64`` constants are typed explicitly: Numba promotes ``uint64`` mixed with a plain
integer literal to ``float64``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import int64, njit, prange, uint32, uint64
from numba.extending import register_jitable

from secagg.kernels.chacha import key_words
from secagg.kernels.config import CPU_LANES
from secagg.kernels.cpu import _LAUNCH, _blocks

__all__ = [
    "COORDS_PER_STREAM",
    "REFILL_BLOCKS",
    "discrete_gaussian",
    "discrete_gaussian_sum",
    "sampler_params",
]

COORDS_PER_STREAM = 256
"""``C``: coordinates drawn from one ChaCha20 stream (part of the layout: changing it changes
every noise vector). 256 keeps a chunk's keystream (~14 words a sample, ~220 blocks) long
against the up to 15 blocks of a final refill that go unread, and still gives a GPU
``d' / 256`` independent streams per component."""

REFILL_BLOCKS = CPU_LANES
"""Blocks generated per refill on the CPU: one vector group of the SIMD block loop."""

_ONE = uint64(1)
_ZERO = uint64(0)
_M32 = uint64(0xFFFFFFFF)
_TWO32 = uint64(1 << 32)
_LIM63 = uint64((1 << 63) - 1)
_LAST_BLOCK = uint64((1 << 32) - 2)
_B58 = uint64(1 << 58)

# st (uint64[4]): next block counter, position in buf (words), flag, words per refill.
_BLOCK, _POS, _FLAG, _FILL = 0, 1, 2, 3


@register_jitable
def _refill(keys: Any, nonces: Any, buf: Any, st: Any) -> None:
    """The next ``st[3] / 16`` blocks of the chunk's stream into ``buf[: st[3]]``."""
    nb = st[_FILL] // uint64(16)
    if st[_BLOCK] + nb - _ONE > _LAST_BLOCK:
        st[_FLAG] = _ONE
        return
    _blocks(keys, nonces, 0, int64(st[_BLOCK]), int64(nb), buf, buf[int64(st[_FILL]) :])
    st[_BLOCK] += nb
    st[_POS] = _ZERO


@register_jitable(inline="always")
def _word(keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    """Next 32-bit keystream word (as ``uint64``); ``0`` with ``st[2]`` set past the stream."""
    if st[_POS] >= st[_FILL]:
        _refill(keys, nonces, buf, st)
        if st[_FLAG] != _ZERO:
            return _ZERO
    x = uint64(buf[st[_POS]])
    st[_POS] += _ONE
    return x


@register_jitable
def _below(m: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    """Uniform in ``[0, m)``, ``1 <= m < 2^63`` (see the module docstring for the two paths)."""
    if m < _TWO32:
        # Lemire (2019): floor(u m / 2^32) for a 32-bit u, rejecting u when the low half of
        # u m is below 2^32 mod m, so that every result has exactly floor(2^32 / m) preimages.
        prod = _word(keys, nonces, buf, st) * m
        low = prod & _M32
        if low < m:
            thr = (_TWO32 - m) % m
            while low < thr:
                if st[_FLAG] != _ZERO:
                    return _ZERO
                prod = _word(keys, nonces, buf, st) * m
                low = prod & _M32
        return prod >> uint64(32)
    # Lemire on a 64-bit u (two words, low first): floor(u m / 2^64), rejecting u while the
    # low 64 bits of u m are below 2^64 mod m. The 128-bit product from 32-bit halves.
    while True:
        lo = _word(keys, nonces, buf, st)
        u = lo | (_word(keys, nonces, buf, st) << uint64(32))
        if st[_FLAG] != _ZERO:
            return _ZERO
        hi, low = _mul128(u, m)
        if low >= m:
            return hi
        if low >= (~m + _ONE) % m:
            return hi


@register_jitable
def _mul128(u: Any, m: Any) -> Any:
    """``(floor(u m / 2^64), u m mod 2^64)`` for ``uint64`` ``u``, ``m``."""
    u0 = u & _M32
    u1 = u >> uint64(32)
    m0 = m & _M32
    m1 = m >> uint64(32)
    p00 = u0 * m0
    p01 = u0 * m1
    p10 = u1 * m0
    mid = (p00 >> uint64(32)) + (p01 & _M32) + (p10 & _M32)
    hi = u1 * m1 + (p01 >> uint64(32)) + (p10 >> uint64(32)) + (mid >> uint64(32))
    return hi, (mid << uint64(32)) | (p00 & _M32)


@register_jitable
def _series(a: Any, b: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    """Bernoulli(exp(-a/b)) for ``0 <= a <= b`` (CKS20 Algorithm 1's alternating series)."""
    k = uint64(2) if a == b else _ONE
    while True:
        # b k < 2^63 without a division while k < 32 and b < 2^58 (the kernel's range).
        if (k >= uint64(32) or b >= _B58) and k > _LIM63 // b:
            st[_FLAG] = _ONE
            return False
        if _below(b * k, keys, nonces, buf, st) < a:
            k += _ONE
        else:
            return (k & _ONE) == _ONE
        if st[_FLAG] != _ZERO:
            return False


@register_jitable
def _bernoulli_exp(num: Any, den: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    """Bernoulli(exp(-num/den)): the whole part as Bernoulli(exp(-1)) trials, then the rest."""
    if num < den:  # no division in the common case
        if num == _ZERO:
            return True
        return _series(num, den, keys, nonces, buf, st)
    whole = num // den
    frac = num - whole * den
    i = _ZERO
    while i < whole:
        if not _series(_ONE, _ONE, keys, nonces, buf, st):
            return False
        i += _ONE
    if frac == _ZERO:
        return True
    return _series(frac, den, keys, nonces, buf, st)


@register_jitable
def _laplace(t: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    """CKS20 Algorithm 2: ``Lap_Z(t)``."""
    while True:
        if st[_FLAG] != _ZERO:
            return int64(0)
        u = _below(t, keys, nonces, buf, st)
        if not _bernoulli_exp(u, t, keys, nonces, buf, st):
            continue
        v = _ZERO
        while _series(_ONE, _ONE, keys, nonces, buf, st):  # Bernoulli(exp(-1))
            v += _ONE
        neg = _word(keys, nonces, buf, st) & _ONE
        if st[_FLAG] != _ZERO:
            return int64(0)
        if neg == _ONE and u == _ZERO and v == _ZERO:
            continue
        x = int64(u + t * v)
        return -x if neg == _ONE else x


@register_jitable
def _sample(keys: Any, nonces: Any, buf: Any, st: Any, p: Any, tq: Any, t: Any, den: Any,
            amax: Any) -> Any:  # fmt: skip
    """One draw of ``N_Z(0, p)`` (CKS20 Algorithm 3) from the chunk's stream; may set the flag.

    Shared by the CPU kernel below and the CUDA kernel (:mod:`secagg.kernels.dp_noise_cuda`).
    """
    while True:
        y = _laplace(uint64(t), keys, nonces, buf, st)
        if st[_FLAG] != _ZERO:
            return int64(0)
        a = y if y >= 0 else -y
        if a > amax:
            st[_FLAG] = _ONE
            return int64(0)
        x = a * tq - int64(p)
        ax = x if x >= 0 else -x
        if ax >= int64(1 << 32):
            st[_FLAG] = _ONE
            return int64(0)
        xx = uint64(ax)
        if _bernoulli_exp(xx * xx, uint64(den), keys, nonces, buf, st):
            return y
        if st[_FLAG] != _ZERO:
            return int64(0)


@register_jitable
def _set_nonce(nonces: Any, tag: Any, c: Any) -> None:
    """Nonce ``tag || LE88(c)`` as three little-endian words."""
    cc = uint64(c)
    nonces[0, 0] = uint32(uint64(tag) | ((cc & uint64(0xFFFFFF)) << uint64(8)))
    nonces[0, 1] = uint32((cc >> uint64(24)) & _M32)
    nonces[0, 2] = uint32(cc >> uint64(56))


@register_jitable
def _chunk(
    keys: Any, nonces: Any, buf: Any, st: Any, row: Any, params: Any, lo: Any, hi: Any, out: Any,
    fill: Any,
) -> bool:  # fmt: skip
    """Samples ``lo .. hi - 1`` of vector ``row`` into ``out[0 : hi - lo]``; True if flagged.

    ``keys[0]`` must hold the row's key and ``nonces[0]`` the chunk's nonce.
    """
    st[_BLOCK] = _ZERO
    st[_POS] = uint64(fill)
    st[_FLAG] = _ZERO
    st[_FILL] = uint64(fill)
    p = params[row, 0]
    tq = params[row, 1]
    t = params[row, 2]
    den = params[row, 3]
    amax = params[row, 4]
    for i in range(hi - lo):
        out[i] = _sample(keys, nonces, buf, st, p, tq, t, den, amax)
        if st[_FLAG] != _ZERO:
            return True
    return False


@njit(parallel=True, cache=True, nogil=True)  # drawn beside training: releases the GIL
def _dg_sum_kernel(
    keys: Any, tag: Any, params: Any, count: Any, out: Any, flags: Any
) -> None:  # fmt: skip
    """``out[i] = sum_r sample_r(i)`` over the rows whose chunk was not flagged."""
    n_chunks = (count + COORDS_PER_STREAM - 1) // COORDS_PER_STREAM
    m = keys.shape[0]
    fill = 16 * REFILL_BLOCKS
    for c in prange(n_chunks):
        k1 = np.empty((1, 8), dtype=np.uint32)
        nonces = np.empty((1, 3), dtype=np.uint32)
        buf = np.empty(2 * fill, dtype=np.uint32)
        st = np.zeros(4, dtype=np.uint64)
        acc = np.zeros(COORDS_PER_STREAM, dtype=np.int64)
        loc = np.empty(COORDS_PER_STREAM, dtype=np.int64)
        _set_nonce(nonces, tag, c)
        lo = c * COORDS_PER_STREAM
        hi = min(count, lo + COORDS_PER_STREAM)
        for r in range(m):
            for w in range(8):
                k1[0, w] = keys[r, w]
            if _chunk(k1, nonces, buf, st, r, params, lo, hi, loc, fill):
                flags[r, c] = True
            else:
                for i in range(hi - lo):
                    acc[i] += loc[i]
        for i in range(hi - lo):
            out[lo + i] = acc[i]


def sampler_params(sigma2s: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Per-row kernel constants ``(p, t q, t, 2 p q t^2, amax)`` for integer variances ``p``.

    ``t = floor(sqrt(p)) + 1`` (CKS20 Algorithm 3), ``q = 1``; ``amax`` bounds ``|Y|`` so that
    ``|Y| t - p`` fits 62 bits. The caller checks ``1 <= p <=``
    :func:`secagg.dp.sampling.max_integer_variance` (so ``2 p t^2 < 2^58``).
    """
    rows = []
    for s in np.asarray(sigma2s).tolist():
        p = int(s)
        t = math.isqrt(p) + 1
        rows.append((p, t, t, 2 * p * t * t, ((1 << 62) - p) // t))
    return np.array(rows, dtype=np.int64).reshape(-1, 5)


def discrete_gaussian_sum(
    keys: npt.NDArray[np.uint32], tag: int, sigma2s: npt.ArrayLike, count: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Sum over rows of ``count`` samples of ``N_Z(0, sigma2s[r])`` under key ``keys[r]``.

    ``keys`` is ``(m, 8)`` key words. Returns the sum over the (row, chunk) pairs that were not
    flagged, and the ``(m, n_chunks)`` flags; the caller
    (:func:`secagg.dp.streams.discrete_gaussian_sum`) checks the variance range and adds the
    exact reference for flagged pairs.
    """
    n_chunks = -(-count // COORDS_PER_STREAM)
    out = np.zeros(count, dtype=np.int64)
    flags = np.zeros((keys.shape[0], n_chunks), dtype=np.bool_)
    if count and keys.shape[0]:
        params = sampler_params(sigma2s)
        with _LAUNCH:  # one parallel region at a time (kernels/cpu.py: workqueue layer)
            _dg_sum_kernel(np.ascontiguousarray(keys), tag, params, count, out, flags)
    return out, flags


def discrete_gaussian(
    key: bytes, tag: int, sigma2: int, count: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """One vector: :func:`discrete_gaussian_sum` with one row (flags of shape ``(1, chunks)``)."""
    return discrete_gaussian_sum(key_words(key).reshape(1, 8), tag, [sigma2], count)
