"""Numba CPU kernel: exact discrete Gaussian noise, one ChaCha20 stream per coordinate.

The layout and the algorithm are defined by :mod:`secagg.dp.streams` (its scalar reference,
with Python integers, is the specification; the tests compare the two bit for bit). Sample
``i`` reads the keystream under nonce ``tag || LE88(i)`` from block 0, eight bytes per draw,
and runs CKS20 Algorithms 1-3 in ``uint64`` arithmetic. Where an integer would leave 64 bits
the kernel stops that sample and flags it; the caller recomputes flagged samples with the
reference, so the output never depends on a tail bound.

All ``uint64`` constants are typed explicitly: Numba promotes ``uint64`` mixed with a plain
integer literal to ``float64``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numba import int64, njit, prange, uint32, uint64
from numba.extending import register_jitable

from secagg.kernels.chacha import chacha20_block, key_words

__all__ = ["discrete_gaussian"]

_ONE = uint64(1)
_ZERO = uint64(0)
_LIM63 = uint64((1 << 63) - 1)
_LAST_BLOCK = uint64((1 << 32) - 2)


@register_jitable
def _word(keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    """Next keystream word; ``st = [next block, position in buf, flag]``."""
    if st[1] >= uint64(8):
        if st[0] > _LAST_BLOCK:
            st[2] = _ONE
            return _ZERO
        w = chacha20_block(keys, 0, uint32(st[0]), nonces)
        for j in range(8):
            buf[j] = uint64(w[2 * j]) | (uint64(w[2 * j + 1]) << uint64(32))
        st[0] += _ONE
        st[1] = _ZERO
    x = buf[st[1]]
    st[1] += _ONE
    return x


@register_jitable
def _below(m: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    # One division per draw: with r = u mod m, u lies in a whole bucket [u - r, u - r + m)
    # exactly when u - r <= 2^64 - m (the top partial bucket is rejected).
    top = ~m + _ONE  # 2^64 - m, without a wrapping subtraction
    while True:
        u = _word(keys, nonces, buf, st)
        if st[2] != _ZERO:
            return _ZERO
        r = u % m
        if u - r <= top:
            return r


@register_jitable
def _series(a: Any, b: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
    k = uint64(2) if a == b else _ONE
    while True:
        if k > _LIM63 // b:
            st[2] = _ONE
            return False
        if _below(b * k, keys, nonces, buf, st) < a:
            k += _ONE
        else:
            return (k & _ONE) == _ONE
        if st[2] != _ZERO:
            return False


@register_jitable
def _bernoulli_exp(num: Any, den: Any, keys: Any, nonces: Any, buf: Any, st: Any) -> Any:
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
    while True:
        if st[2] != _ZERO:
            return int64(0)
        u = _below(t, keys, nonces, buf, st)
        if not _bernoulli_exp(u, t, keys, nonces, buf, st):
            continue
        v = _ZERO
        while _bernoulli_exp(_ONE, _ONE, keys, nonces, buf, st):
            v += _ONE
        neg = _word(keys, nonces, buf, st) & _ONE
        if st[2] != _ZERO:
            return int64(0)
        if neg == _ONE and u == _ZERO and v == _ZERO:
            continue
        x = int64(u + t * v)
        return -x if neg == _ONE else x


@register_jitable
def _sample(
    i: Any, keys: Any, nonces: Any, buf: Any, st: Any, tag: Any, p: Any, tq: Any, t: Any,
    den: Any, amax: Any,
) -> Any:  # fmt: skip
    """Sample ``i`` (CKS20 Algorithm 3 on its own stream); sets ``st[2]`` when flagged.

    Shared by the CPU kernel below and the CUDA kernel (:mod:`secagg.kernels.dp_noise_cuda`).
    """
    ii = uint64(i)
    nonces[0, 0] = uint32(uint64(tag) | ((ii & uint64(0xFFFFFF)) << uint64(8)))
    nonces[0, 1] = uint32((ii >> uint64(24)) & uint64(0xFFFFFFFF))
    nonces[0, 2] = uint32(ii >> uint64(56))
    st[0] = _ZERO
    st[1] = uint64(8)
    st[2] = _ZERO
    while True:
        y = _laplace(uint64(t), keys, nonces, buf, st)
        if st[2] != _ZERO:
            return int64(0)
        a = y if y >= 0 else -y
        if a > amax:
            st[2] = _ONE
            return int64(0)
        x = a * tq - int64(p)
        ax = x if x >= 0 else -x
        if ax >= int64(1 << 32):
            st[2] = _ONE
            return int64(0)
        xx = uint64(ax)
        if _bernoulli_exp(xx * xx, uint64(den), keys, nonces, buf, st):
            return y
        if st[2] != _ZERO:
            return int64(0)


_CHUNK = 1024
"""Samples per parallel task: work buffers are allocated once per chunk, not per sample."""


@njit(parallel=True, cache=True)
def _dg_kernel(
    key: Any, tag: Any, p: Any, q: Any, t: Any, den: Any, amax: Any, out: Any, flags: Any
) -> None:
    n = out.shape[0]
    tq = int64(t * q)
    keys = key.reshape(1, 8)
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        nonces = np.empty((1, 3), dtype=np.uint32)
        buf = np.empty(8, dtype=np.uint64)
        st = np.zeros(3, dtype=np.uint64)
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            out[i] = _sample(i, keys, nonces, buf, st, tag, p, tq, t, den, amax)
            flags[i] = st[2] != _ZERO


def discrete_gaussian(
    key: bytes, tag: int, sigma2: int, count: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """``count`` samples of ``N_Z(0, sigma2)`` (integer variance) and the flagged indices.

    The caller (:func:`secagg.dp.streams.discrete_gaussian_vector`) checks the variance range
    and recomputes flagged samples exactly.
    """
    import math

    t = math.isqrt(sigma2) + 1
    den = 2 * sigma2 * t * t
    amax = ((1 << 62) - sigma2) // t
    out = np.zeros(count, dtype=np.int64)
    flags = np.zeros(count, dtype=np.bool_)
    _dg_kernel(key_words(key), tag, sigma2, 1, t, den, amax, out, flags)
    return out, np.flatnonzero(flags)
