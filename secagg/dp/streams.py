"""Chunked stream layout for noise vectors, and its exact scalar reference.

Noise component vectors use one ChaCha20 stream per *chunk* of :data:`COORDS_PER_STREAM`
(``C = 256``) coordinates: coordinates ``c C .. c C + C - 1`` of the vector under key ``K``
are drawn in order from the keystream of ``K`` with the 96-bit nonce
``Purpose.DP_NOISE || LE88(c)`` (the tag byte, then the chunk index ``c`` in the 11
remaining bytes, little-endian; RFC 8439 section 2.3), read from block 0 as consecutive
little-endian 32-bit words, every word used. Each coordinate runs CKS20 Algorithm 3
(:mod:`secagg.dp.sampling` has the same algorithms, batched, on a 64-bit word stream) where
the previous one stopped, so chunks are independent of one another and of the order in which
they are computed: the Numba kernel (:mod:`secagg.kernels.dp_noise`) computes them in
parallel, and this module's scalar reference, with Python integers (no overflow possible),
defines them. A vector's first ``k`` coordinates do not depend on its length.

Uniform integers below ``m`` (:meth:`ChunkWords.below`) by Lemire's multiply-shift rejection:
for ``m < 2^32`` one word ``u`` gives ``floor(u m / 2^32)``, rejecting ``u`` while the low
32 bits of ``u m`` are below ``2^32 mod m``; for ``2^32 <= m < 2^64`` two words (low first)
make a 64-bit ``u`` and the same rule with ``2^64``. Exactly uniform, and the kernel divides
only when the low half falls below ``m``. The sign of a Laplace draw is bit 0 of one word.

A chunk whose integers would leave 64 bits in the kernel (a Laplace candidate past about
``16 sigma``, more than ~31 series terms) is flagged there and recomputed here from its own
stream, so the vector is exactly the reference's in every case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import numpy.typing as npt
from Crypto.Cipher import ChaCha20

from secagg.errors import ConfigurationError
from secagg.prg import KEY_BYTES, Purpose

__all__ = [
    "COORDS_PER_STREAM",
    "ChunkWords",
    "chunk_nonce",
    "dg_chunk_reference",
    "dg_sample_reference",
    "discrete_gaussian_sum",
    "discrete_gaussian_vector",
    "lemire",
]

COORDS_PER_STREAM = 256
"""``C``: coordinates per ChaCha20 stream (the kernel's
:data:`secagg.kernels.dp_noise.COORDS_PER_STREAM`; part of the layout)."""

MAX_CHUNKS = 1 << 64
"""Chunk indices fit the 88 nonce bits; the kernel takes them as ``uint64``."""

_TWO32 = 1 << 32


def chunk_nonce(c: int) -> bytes:
    """The 12-byte nonce of chunk ``c``: ``DP_NOISE`` tag then ``c`` little-endian (11 bytes)."""
    if not 0 <= c < MAX_CHUNKS:
        raise ConfigurationError(f"chunk index {c} outside [0, 2^64)")
    return bytes([int(Purpose.DP_NOISE)]) + c.to_bytes(11, "little")


def lemire(u: int, m: int, bits: int) -> int | None:
    """Lemire's rule for an ``L``-bit ``u`` (``L = bits``): ``floor(u m / 2^L)``, or ``None``
    (reject) when ``u m mod 2^L < 2^L mod m``. Exactly ``floor(2^L / m)`` of the ``2^L``
    values of ``u`` map to each result in ``[0, m)`` (D. Lemire, "Fast random integer
    generation in an interval", ACM TOMACS 2019)."""
    prod = u * m
    return prod >> bits if prod % (1 << bits) >= (1 << bits) % m else None


class ChunkWords:
    """Sequential 32-bit words of one chunk's stream (one 64-byte block at a time)."""

    __slots__ = ("_buf", "_cipher", "_pos")

    def __init__(self, key: bytes, c: int) -> None:
        self._cipher = ChaCha20.new(key=key, nonce=chunk_nonce(c))
        self._buf: list[int] = []
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._buf):
            block = self._cipher.encrypt(bytes(64))
            self._buf = [int.from_bytes(block[4 * j : 4 * j + 4], "little") for j in range(16)]
            self._pos = 0
        w = self._buf[self._pos]
        self._pos += 1
        return w

    def below(self, m: int) -> int:
        """Uniform in ``[0, m)``, ``m >= 1``, by Lemire's multiply-shift rejection.

        ``u`` has ``L = 32 w`` bits from ``w`` words, low first: ``w = 1`` for ``m < 2^32``,
        else ``w = max(2, ceil(bitlen(m) / 32))`` (two for every ``m < 2^64``, the kernel's
        range; wider only on flagged chunks). Accept ``u`` when ``u m mod 2^L >= 2^L mod m``
        and return ``floor(u m / 2^L)``: every value then has exactly ``floor(2^L / m)``
        accepted preimages.
        """
        n = 1 if m < _TWO32 else max(2, -(-m.bit_length() // 32))
        while True:
            u = 0
            for j in range(n):
                u |= self.next() << (32 * j)
            r = lemire(u, m, 32 * n)
            if r is not None:
                return r

    def series(self, a: int, b: int) -> bool:
        """Bernoulli(exp(-a/b)), ``0 <= a <= b`` (CKS20 Algorithm 1; ``K = 2`` first if a = b)."""
        k = 2 if a == b else 1
        while self.below(b * k) < a:
            k += 1
        return k % 2 == 1

    def bernoulli_exp(self, num: int, den: int) -> bool:
        whole, frac = divmod(num, den)
        for _ in range(whole):
            if not self.series(1, 1):
                return False
        return frac == 0 or self.series(frac, den)

    def discrete_laplace(self, t: int) -> int:
        while True:
            u = self.below(t)
            if not self.bernoulli_exp(u, t):
                continue
            v = 0
            while self.bernoulli_exp(1, 1):
                v += 1
            neg = self.next() & 1
            if neg and u == 0 and v == 0:
                continue
            x = u + t * v
            return -x if neg else x

    def discrete_gaussian(self, p: int, q: int) -> int:
        """CKS20 Algorithm 3 for ``sigma^2 = p / q``, ``t = floor(sigma) + 1``."""
        t = math.isqrt(p // q) + 1
        den = 2 * p * q * t * t
        while True:
            y = self.discrete_laplace(t)
            x = abs(y) * t * q - p
            if self.bernoulli_exp(x * x, den):
                return y


def _variance(sigma2: Fraction | int, key: bytes) -> tuple[int, int]:
    s = Fraction(sigma2)
    if s <= 0 or len(key) != KEY_BYTES:
        raise ConfigurationError("need a 32-byte key and a positive variance")
    return s.numerator, s.denominator


def dg_chunk_reference(key: bytes, c: int, sigma2: Fraction | int, count: int) -> list[int]:
    """The first ``count <= C`` coordinates of chunk ``c`` of the vector of ``key``, exactly.

    CKS20 Algorithm 3 with ``t = floor(sigma) + 1``, accepting ``Y`` with probability
    ``exp(-(|Y| t q - p)^2 / (2 p q t^2))`` for ``sigma2 = p / q``, coordinate after coordinate
    on the chunk's one stream.
    """
    p, q = _variance(sigma2, key)
    if not 0 <= count <= COORDS_PER_STREAM:
        raise ConfigurationError(f"a chunk has at most {COORDS_PER_STREAM} coordinates")
    w = ChunkWords(key, c)
    return [w.discrete_gaussian(p, q) for _ in range(count)]


def dg_sample_reference(key: bytes, i: int, sigma2: Fraction | int) -> int:
    """Coordinate ``i`` of the noise vector of ``key``: one exact draw of ``N_Z(0, sigma2)``.

    Recomputes the prefix of chunk ``i // C`` (:func:`dg_chunk_reference`); for tests.
    """
    c, r = divmod(i, COORDS_PER_STREAM)
    return dg_chunk_reference(key, c, sigma2, r + 1)[-1]


def _check(keys: Sequence[bytes], sigma2s: Sequence[int]) -> None:
    from secagg.dp.sampling import max_integer_variance

    if len(keys) != len(sigma2s):
        raise ConfigurationError(f"{len(keys)} noise keys for {len(sigma2s)} variances")
    for s2 in sigma2s:
        if not 1 <= s2 <= max_integer_variance():
            raise ConfigurationError(
                f"noise variance {s2} outside [1, {max_integer_variance()}] (exact kernel range)"
            )
    for key in keys:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"noise keys are {KEY_BYTES} bytes")


def discrete_gaussian_sum(
    keys: Sequence[bytes], sigma2s: Sequence[int], count: int, *, backend: str = "cpu"
) -> npt.NDArray[np.int64]:
    """``sum_r`` (vector of ``keys[r]`` with integer variance ``sigma2s[r]``), ``count`` long.

    One parallel pass over all vectors (Numba kernel; flagged chunks exactly here). Each
    ``sigma2s[r]`` is in ``[1,`` :func:`secagg.dp.sampling.max_integer_variance` ``]``.
    ``backend`` is ``"cpu"`` (Numba, all cores) or ``"cuda"``
    (:mod:`secagg.kernels.dp_noise_cuda`); both give the same vector.
    """
    if backend == "cuda":
        from secagg.kernels import dp_noise_cuda as dp_noise
    elif backend == "cpu":
        from secagg.kernels import dp_noise  # type: ignore[no-redef]
    else:
        raise ConfigurationError(f"noise backend must be 'cpu' or 'cuda', got {backend!r}")
    sigma2s = [int(s) for s in sigma2s]
    _check(keys, sigma2s)
    if count < 0:
        raise ConfigurationError(f"negative noise length {count}")
    from secagg.kernels.chacha import key_words

    words = np.empty((len(keys), 8), dtype=np.uint32)
    for r, key in enumerate(keys):
        words[r] = key_words(key)
    out, flags = dp_noise.discrete_gaussian_sum(words, int(Purpose.DP_NOISE), sigma2s, count)
    for r, c in zip(*np.nonzero(flags), strict=True):
        lo = int(c) * COORDS_PER_STREAM
        hi = min(count, lo + COORDS_PER_STREAM)
        out[lo:hi] += np.array(
            dg_chunk_reference(keys[int(r)], int(c), sigma2s[int(r)], hi - lo), dtype=np.int64
        )
    return out


def discrete_gaussian_vector(
    key: bytes, sigma2: int, count: int, *, backend: str = "cpu"
) -> npt.NDArray[np.int64]:
    """``count`` coordinates of the vector of ``key`` (:func:`discrete_gaussian_sum`, one row)."""
    return discrete_gaussian_sum([key], [sigma2], count, backend=backend)
