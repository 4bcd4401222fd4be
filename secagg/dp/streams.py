"""Per-sample stream layout for noise vectors, and its exact scalar reference.

Noise component vectors use one ChaCha20 stream *per coordinate*: sample ``i`` of the vector
under key ``K`` reads the keystream of ``K`` with the 96-bit nonce
``Purpose.DP_NOISE || LE88(i)`` (the tag byte, then ``i`` in the 11 remaining bytes,
little-endian; RFC 8439 section 2.3), from block 0, eight bytes per draw. Each sample runs
CKS20 Algorithm 3 (:mod:`secagg.dp.sampling` has the same algorithms, batched) on its own
stream, so samples are independent of one another and of the order in which they are
computed: the Numba kernel (:mod:`secagg.kernels.dp_noise`) computes them in parallel, and
this module's scalar reference, with Python integers (no overflow possible), defines them.

A sample whose integers would leave 64 bits in the kernel (a Laplace candidate past about
``16 sigma``, more than ~31 series terms) is flagged there and recomputed here from its own
stream, so the vector is exactly the reference's in every case.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import numpy.typing as npt
from Crypto.Cipher import ChaCha20

from secagg.errors import ConfigurationError
from secagg.prg import KEY_BYTES, Purpose

__all__ = ["dg_sample_reference", "discrete_gaussian_vector", "sample_nonce"]

MAX_SAMPLES = 1 << 64
"""Sample indices fit the 88 nonce bits; the kernel takes them as ``uint64``."""


def sample_nonce(i: int) -> bytes:
    """The 12-byte nonce of sample ``i``: ``DP_NOISE`` tag then ``i`` little-endian (11 bytes)."""
    if not 0 <= i < MAX_SAMPLES:
        raise ConfigurationError(f"sample index {i} outside [0, 2^64)")
    return bytes([int(Purpose.DP_NOISE)]) + i.to_bytes(11, "little")


class _Words:
    """Sequential ``uint64`` words of one sample's stream (one 64-byte block at a time)."""

    __slots__ = ("_buf", "_cipher", "_pos")

    def __init__(self, key: bytes, i: int) -> None:
        self._cipher = ChaCha20.new(key=key, nonce=sample_nonce(i))
        self._buf: list[int] = []
        self._pos = 0

    def next(self) -> int:
        if self._pos == len(self._buf):
            block = self._cipher.encrypt(bytes(64))
            self._buf = [int.from_bytes(block[8 * j : 8 * j + 8], "little") for j in range(8)]
            self._pos = 0
        w = self._buf[self._pos]
        self._pos += 1
        return w

    def below(self, m: int) -> int:
        """Uniform in ``[0, m)``, ``1 <= m < 2^64``: ``u mod m`` unless ``u`` is in the top
        partial bucket (``u - (u mod m) > 2^64 - m``), then redraw."""
        while True:
            u = self.next()
            r = u % m
            if u - r <= (1 << 64) - m:
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


def dg_sample_reference(key: bytes, i: int, sigma2: Fraction | int) -> int:
    """Sample ``i`` of the noise vector of ``key``: one exact draw of ``N_Z(0, sigma2)``.

    CKS20 Algorithm 3 with ``t = floor(sigma) + 1``, accepting ``Y`` with probability
    ``exp(-(|Y| t q - p)^2 / (2 p q t^2))`` for ``sigma2 = p / q``. Wider moduli than 2^64 never
    arise for the variances :func:`discrete_gaussian_vector` admits.
    """
    s = Fraction(sigma2)
    if s <= 0 or len(key) != KEY_BYTES:
        raise ConfigurationError("need a 32-byte key and a positive variance")
    p, q = s.numerator, s.denominator
    t = math.isqrt(p // q) + 1
    den = 2 * p * q * t * t
    w = _Words(key, i)
    while True:
        y = w.discrete_laplace(t)
        x = abs(y) * t * q - p
        if w.bernoulli_exp(x * x, den):
            return y


def discrete_gaussian_vector(
    key: bytes, sigma2: int, count: int, *, backend: str = "cpu"
) -> npt.NDArray[np.int64]:
    """``count`` samples of the per-sample layout (Numba kernel, flagged samples exactly here).

    ``sigma2`` is an integer variance, ``1 <= sigma2 <=``
    :func:`secagg.dp.sampling.max_integer_variance`. ``backend`` is ``"cpu"`` (Numba,
    all cores) or ``"cuda"`` (:mod:`secagg.kernels.dp_noise_cuda`); both give the same vector.
    """
    from secagg.dp.sampling import max_integer_variance

    if backend == "cuda":
        from secagg.kernels import dp_noise_cuda as dp_noise
    elif backend == "cpu":
        from secagg.kernels import dp_noise  # type: ignore[no-redef]
    else:
        raise ConfigurationError(f"noise backend must be 'cpu' or 'cuda', got {backend!r}")

    if not 1 <= sigma2 <= max_integer_variance():
        raise ConfigurationError(
            f"noise variance {sigma2} outside [1, {max_integer_variance()}] (exact kernel range)"
        )
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"noise keys are {KEY_BYTES} bytes")
    out, flagged = dp_noise.discrete_gaussian(key, int(Purpose.DP_NOISE), sigma2, count)
    for i in flagged.tolist():
        out[i] = dg_sample_reference(key, i, sigma2)
    return out
