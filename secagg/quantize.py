"""Quantization and lane packing: the numpy reference the kernels must match bit for bit.

Encoding of one client's update ``x`` (``dim`` floats) with weight ``w``:

1. clip each value to ``[-c, c]``;
2. ``t = (x + c) * scale`` in float64 with ``scale = (2^b - 1) / (2c)``;
3. unbiased stochastic rounding ``q = min(floor(t + r * 2^-32), 2^b - 1)`` where ``r`` is the
   uint32 element ``j`` of the ChaCha20 stream under the client's rounding key
   (:data:`secagg.prg.Purpose.ROUNDING`), so ``E[q] = t`` and results are reproducible;
4. weighted rounds carry ``w * q`` and append one more value, ``w`` itself, so the server can
   form the weighted average without seeing any weight;
5. values are packed into ``uint64`` words, ``P = 64 // L`` lanes of ``L`` bits per word,
   lane-major: with ``W = ceil(m / P)`` words for ``m`` values, value ``j`` sits in word
   ``j mod W`` at bit offset ``L * (j // W)``.

``L`` leaves ``ceil(log2 n)`` bits of headroom (Bonawitz et al. 2017, section 3: inputs are
summed in a ring large enough that the sum never wraps), so the word-wise sum mod 2^64 of ``n``
packed vectors is the packed vector of the lane-wise sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, InfeasibleParameters, InputError
from secagg.prg import Purpose, keystream_u32

__all__ = ["QuantSpec", "dequantize", "encode", "lane_values", "pack", "quantize", "unpack"]

WORD_BITS = 64
"""Packed words are uint64; masking is arithmetic mod 2^64 on whole words."""

MAX_BITS = 32
"""Quantization levels at most 2^32 (the rounding draw is one uint32 per value)."""

FEDAVG_MAX_WEIGHT = 65535
"""Default bound on one site's FedAvg weight (its sample count) in service rounds
(``secagg round create``, ``keygen --ckks``, provisioning): 16 weight bits per value."""

_TWO_M32 = 2.0**-32


def weight_bits_for(max_weight: int) -> int:
    """Bits the weight factor takes in ``w * q``: 0 when unweighted (``max_weight == 1``)."""
    return max_weight.bit_length() if max_weight > 1 else 0


def headroom_bits_for(n_clients: int) -> int:
    """``ceil(log2 n)``: the sum of ``n`` lanes never carries out of its lane."""
    return (n_clients - 1).bit_length()


def lane_bits_for(bits: int, n_clients: int, max_weight: int) -> int:
    """Width of one lane; the masked words and the CKKS slots (``secagg.he_params``) share it."""
    return bits + weight_bits_for(max_weight) + headroom_bits_for(n_clients)


@dataclass(frozen=True)
class QuantSpec:
    """Quantization and packing parameters of one round.

    Parameters
    ----------
    clip:
        Values are clipped to ``[-clip, clip]``.
    bits:
        Quantization bits per value (``2^bits`` levels), 1..32.
    n_clients:
        Upper bound on the number of summed inputs (the roster size): sets the headroom.
    max_weight:
        Largest weight a client may carry. ``1`` means an unweighted round (no weight lane).
    """

    clip: float
    bits: int
    n_clients: int
    max_weight: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigurationError(f"clip must be a positive finite number, got {self.clip}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ConfigurationError(f"bits must be in 1..{MAX_BITS}, got {self.bits}")
        if self.n_clients < 1:
            raise ConfigurationError(f"n_clients must be >= 1, got {self.n_clients}")
        if self.max_weight < 1:
            raise ConfigurationError(f"max_weight must be >= 1, got {self.max_weight}")
        if self.lane_bits > WORD_BITS:
            raise InfeasibleParameters(
                f"a lane needs {self.bits} value bits + {self.weight_bits} weight bits + "
                f"{self.headroom_bits} headroom bits = {self.lane_bits} > {WORD_BITS}; "
                "lower bits or max_weight"
            )

    @property
    def weighted(self) -> bool:
        """Whether values carry a weight (``max_weight > 1``)."""
        return self.max_weight > 1

    @property
    def weight_bits(self) -> int:
        """Bits taken by the weight factor in ``w * q`` (0 when unweighted)."""
        return weight_bits_for(self.max_weight)

    @property
    def headroom_bits(self) -> int:
        """``ceil(log2 n)``: the sum of ``n`` lanes never carries out of its lane."""
        return headroom_bits_for(self.n_clients)

    @property
    def lane_bits(self) -> int:
        """Width ``L`` of one lane."""
        return lane_bits_for(self.bits, self.n_clients, self.max_weight)

    @property
    def lanes_per_word(self) -> int:
        """``P = 64 // L`` lanes per uint64 word."""
        return WORD_BITS // self.lane_bits

    @property
    def scale(self) -> float:
        """Quantization scale ``(2^b - 1) / (2c)``, levels per unit."""
        return float((1 << self.bits) - 1) / (2.0 * self.clip)

    @property
    def max_level(self) -> int:
        """Largest quantized value ``2^b - 1``."""
        return (1 << self.bits) - 1

    def values(self, dim: int) -> int:
        """Number of lane values for a vector of ``dim`` parameters (weight lane included)."""
        return dim + (1 if self.weighted else 0)

    def words(self, dim: int) -> int:
        """Number of packed uint64 words for a vector of ``dim`` parameters."""
        return -(-self.values(dim) // self.lanes_per_word)


def quantize(x: npt.ArrayLike, spec: QuantSpec, rounding_key: bytes) -> npt.NDArray[np.uint64]:
    """Clip and stochastically round ``x`` to ``spec.bits`` bits (steps 1-3 above).

    Raises
    ------
    InputError
        If ``x`` is not one-dimensional or holds NaN.
    """
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InputError(f"expected a flat vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"expected a real-valued vector, got dtype {arr.dtype}")
    xf = arr.astype(np.float64)
    if np.isnan(xf).any():
        raise InputError("input holds NaN")
    c = float(spec.clip)
    t = (np.clip(xf, -c, c) + c) * spec.scale
    r = keystream_u32(rounding_key, Purpose.ROUNDING, xf.size).astype(np.float64)
    q = np.floor(t + r * _TWO_M32)
    return np.minimum(q, float(spec.max_level)).astype(np.uint64)


def pack(values: npt.NDArray[np.uint64], spec: QuantSpec) -> npt.NDArray[np.uint64]:
    """Pack lane values (each below ``2^L``) lane-major into uint64 words (step 5 above)."""
    m = values.size
    per = spec.lanes_per_word
    w = -(-m // per)
    padded = np.zeros(w * per, dtype=np.uint64)
    padded[:m] = values
    words = np.zeros(w, dtype=np.uint64)
    for lane in range(per):
        words |= padded[lane * w : (lane + 1) * w] << np.uint64(lane * spec.lane_bits)
    return words


def unpack(words: npt.NDArray[np.uint64], spec: QuantSpec, count: int) -> npt.NDArray[np.uint64]:
    """Inverse of :func:`pack`: the first ``count`` lane values of ``words``."""
    per = spec.lanes_per_word
    w = words.size
    if count > w * per:
        raise ConfigurationError(f"{w} words hold at most {w * per} values, asked for {count}")
    mask = np.uint64((1 << spec.lane_bits) - 1) if spec.lane_bits < WORD_BITS else None
    out = np.empty(w * per, dtype=np.uint64)
    for lane in range(per):
        lane_vals = words >> np.uint64(lane * spec.lane_bits)
        out[lane * w : (lane + 1) * w] = lane_vals if mask is None else lane_vals & mask
    return out[:count]


def lane_values(
    x: npt.ArrayLike, weight: int, spec: QuantSpec, rounding_key: bytes
) -> npt.NDArray[np.uint64]:
    """Quantize and weight one client's update (steps 1-4): ``spec.values(dim)`` lane values."""
    if not isinstance(weight, int | np.integer) or isinstance(weight, bool):
        raise InputError(f"weight must be an integer, got {type(weight).__name__}")
    if not 1 <= int(weight) <= spec.max_weight:
        raise InputError(f"weight must be in 1..{spec.max_weight}, got {weight}")
    q = quantize(x, spec, rounding_key)
    if spec.weighted:
        q = np.append(q * np.uint64(weight), np.uint64(weight))
    return q


def encode(
    x: npt.ArrayLike, weight: int, spec: QuantSpec, rounding_key: bytes
) -> npt.NDArray[np.uint64]:
    """Quantize, weight and pack one client's update: the plaintext that gets masked."""
    return pack(lane_values(x, weight, spec, rounding_key), spec)


def dequantize(
    sums: npt.NDArray[np.uint64], spec: QuantSpec, contributors: int, dim: int
) -> tuple[npt.NDArray[np.float64], int]:
    """Turn the lane-wise integer sums into the (weighted) sum of the inputs.

    Parameters
    ----------
    sums:
        Unpacked lane sums, ``spec.values(dim)`` of them.
    contributors:
        Number of inputs in the sum (used as the total weight when unweighted).
    dim:
        Number of parameters.

    Returns
    -------
    (weighted_sum, total_weight):
        ``sum_u w_u x_u`` approximated, and ``sum_u w_u`` (``contributors`` when unweighted).
    """
    total = int(sums[dim]) if spec.weighted else contributors
    s = sums[:dim].astype(np.float64)
    return s / spec.scale - float(total) * spec.clip, total
