"""The DP client's encode and the decode in plain numpy and pycryptodome: the specification.

These are the formulations the fused kernels of :mod:`secagg.kernels.dp_encode` (called by
:mod:`secagg.dp.encoding`, :mod:`secagg.dp.rotation` and :mod:`secagg.dp.packing`) replace,
operation for operation, as they stood before the fusion (docs/dp.md, "Speed"); the tests
compare the two bit for bit on random inputs. Slow (a numpy pass, and a temporary, per
step), obviously right, never on the round's path.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from Crypto.Cipher import ChaCha20

from secagg.dp.encoding import (
    MAX_ROUNDING_ATTEMPTS,
    centre,
    rounded_norm_bound_sq,
)
from secagg.dp.rotation import fwht_reference, padded_dim
from secagg.errors import ConfigurationError, InputError
from secagg.prg import KEY_BYTES, Purpose, nonce_for
from secagg.quantize import WORD_BITS

__all__ = [
    "ReferenceKeyStream",
    "clip_l2",
    "conditional_round",
    "decode_sum",
    "encode_update",
    "norm",
    "pack_ring",
    "rotate",
    "sign_vector",
    "to_ring",
    "unrotate",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


class ReferenceKeyStream:
    """:class:`secagg.dp.randomness.KeyStream`'s words from pycryptodome's ChaCha20."""

    def __init__(self, key: bytes, purpose: Purpose) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"DP stream keys are {KEY_BYTES} bytes, got {len(key)}")
        self._cipher = ChaCha20.new(key=key, nonce=nonce_for(purpose))

    def words(self, count: int) -> U64:
        """The next ``count`` keystream words as ``uint64``."""
        raw = self._cipher.encrypt(bytes(8 * count))
        return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


NORM_BLOCK = 1 << 12
"""Block length of the fixed summation order of :func:`norm`."""


def norm(v: F64) -> float:
    """``||v||_2`` in the order :func:`secagg.kernels.dp_encode.sum_squares` defines: within
    each block of :data:`NORM_BLOCK` elements, eight lanes (element ``j`` in lane ``j mod 8``)
    each summed in order (``cumsum`` is sequential), the lanes added in order, then the
    blocks in order. Zero padding adds ``+0.0`` to sums that are ``>= +0``: a no-op."""
    sq = np.asarray(v, dtype=np.float64).reshape(-1) ** 2
    blocks = -(-sq.size // NORM_BLOCK)
    padded = np.zeros(max(1, blocks) * NORM_BLOCK)
    padded[: sq.size] = sq
    lanes = np.cumsum(padded.reshape(-1, NORM_BLOCK // 8, 8), axis=1)[:, -1, :]
    per_block = np.cumsum(lanes, axis=1)[:, -1]
    return math.sqrt(float(np.cumsum(per_block)[-1]))


def clip_l2(x: npt.ArrayLike, clip: float) -> F64:
    """``x * min(1, clip / ||x||_2)``."""
    v = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise InputError("update contains a NaN or infinity")
    if not clip > 0:
        raise ConfigurationError(f"clip norm must be positive, got {clip}")
    norm_ = norm(v)
    return v * (clip / norm_) if norm_ > clip else v.copy()


def sign_vector(key: bytes, dim: int) -> F64:
    """The ``+-1`` diagonal of ``D``: bit ``j % 64`` of keystream word ``j // 64``, 1 = ``-1``."""
    words = ReferenceKeyStream(key, Purpose.DP_ROTATION).words((dim + 63) // 64)
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:dim]
    return 1.0 - 2.0 * bits.astype(np.float64)


def rotate(x: npt.ArrayLike, key: bytes) -> F64:
    """``H D pad(x) / sqrt(d')``."""
    v = np.asarray(x, dtype=np.float64)
    n = padded_dim(v.shape[0])
    padded = np.zeros(n, dtype=np.float64)
    padded[: v.shape[0]] = v
    padded *= sign_vector(key, n)
    out = fwht_reference(padded)
    out *= 1.0 / np.sqrt(n)
    return out


def unrotate(y: npt.ArrayLike, key: bytes, dim: int) -> F64:
    """``D H y / sqrt(d')`` truncated to ``dim``."""
    v = np.asarray(y, dtype=np.float64)
    n = v.shape[0]
    if n != padded_dim(dim):
        raise ConfigurationError(f"rotated length {n} does not match dimension {dim}")
    out = fwht_reference(v)
    out *= sign_vector(key, n)
    out *= 1.0 / np.sqrt(n)
    return out[:dim]


def _norm_sq(r: I64) -> int:
    return sum(int(v) * int(v) for v in r.tolist())


def conditional_round(z: F64, bound_sq: int, src: ReferenceKeyStream) -> I64:
    """Randomized rounding with 53-bit coins, redrawn until ``||r||^2 <= bound_sq``."""
    if np.abs(z).max(initial=0.0) >= 2.0**52:
        raise InputError("scaled coordinate too large to round exactly (>= 2^52)")
    low = np.floor(z)
    frac53 = ((z - low) * 2.0**53).astype(np.uint64)  # exact: z - low is in [0, 1)
    base = low.astype(np.int64)
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        up = (src.words(z.size) >> np.uint64(11)) < frac53
        r = base + up.astype(np.int64)
        if _norm_sq(r) <= bound_sq:
            return r
    raise InputError(
        f"conditional rounding exceeded ||r||^2 <= {bound_sq} {MAX_ROUNDING_ATTEMPTS} times"
    )


def encode_update(
    x: npt.ArrayLike,
    *,
    clip: float,
    gamma: float,
    beta: float,
    rotation_key: bytes,
    rounding: ReferenceKeyStream,
) -> I64:
    """Clip, rotate, scale by ``gamma``, conditionally round."""
    z = rotate(clip_l2(x, clip), rotation_key) * gamma
    bound = rounded_norm_bound_sq(clip, gamma, z.size, beta)
    if math.isqrt(bound) + 1 >= 1 << 31:
        raise ConfigurationError("Delta_2 too large for exact int64 norm checks (>= 2^31)")
    return conditional_round(z, bound, rounding)


def to_ring(v: I64, bits: int) -> U64:
    """``v mod 2^bits`` as ``uint64``."""
    out = np.asarray(v, dtype=np.int64).astype(np.uint64)
    return out if bits == 64 else out & np.uint64((1 << bits) - 1)


def pack_ring(values: U64, lane_bits: int, words: int) -> U64:
    """Lane-major packing into ``words`` uint64 words."""
    per = WORD_BITS // lane_bits
    padded = np.zeros(words * per, dtype=np.uint64)
    padded[: values.size] = values
    out = np.zeros(words, dtype=np.uint64)
    for lane in range(per):
        out |= padded[lane * words : (lane + 1) * words] << np.uint64(lane * lane_bits)
    return out


def decode_sum(total: U64, *, bits: int, gamma: float, rotation_key: bytes, dim: int) -> F64:
    """Centre mod ``2^bits``, divide by ``gamma``, rotate back."""
    return unrotate(centre(total, bits).astype(np.float64) / gamma, rotation_key, dim)
