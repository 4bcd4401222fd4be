"""CKKS parameters for exact integer aggregation: derivation, security and noise bounds.

The ``ckks`` and ``hybrid`` modes encrypt *integers* with CKKS and only ever add ciphertexts,
so a parameter set is chosen for one question: how many bits of a slot survive the sum of
``n`` ciphertexts exactly, i.e. still round to the right integer after decryption.

Encoding (see ``docs/ckks.md``): CKKS has ``N/2`` complex slots; both the real and the
imaginary part carry one *slot value*, so a ciphertext holds ``N`` slot values. A slot value is
an integer below ``2^value_bits`` made of ``lanes_per_slot`` lanes of ``lane_bits`` bits,
packed like :mod:`secagg.quantize` packs uint64 words.

Derivation, for a single data prime ``q`` (ciphertexts are symmetric, never key-switched, so
no special prime is needed):

* noise: a symmetric encryption decrypts to ``m + e`` with ``e`` centered binomial of variance
  :data:`ERROR_VARIANCE` per coefficient; the encoder adds a rounding error of variance 1/12.
  Decoding is the canonical embedding, so the real and the imaginary part of a slot carry an
  error of variance ``(N/2) * sum of the coefficient variances`` (central limit theorem,
  Costache et al., SAC 2023, eprint 2022/162). After ``n`` ciphertexts and one plaintext:
  ``sigma^2 = (N/2) * (n * (ERROR_VARIANCE + 1/12) + 1/12)`` in units of ``Delta^2``;
* scale ``Delta = 2^scale_bits``: large enough that
  ``TAIL_SIGMAS * sigma / Delta + float_error <= ROUNDING_TOLERANCE``; :func:`select_params`
  takes the largest scale that still fits the most lanes (spare bits go to the noise margin);
* capacity: coefficients stay below ``q/2`` when ``sqrt(2) * 2^value_bits * Delta < q/2``
  (a coefficient is at most the largest slot modulus times ``Delta``), so
  ``value_bits = floor(log2(q_min) - 1.5 - scale_bits)`` with ``q_min = 2^(bits - 1)``;
* security: ``log2 q`` of the whole modulus chain within the HomomorphicEncryption.org limit
  for ``N`` (:data:`HE_STANDARD_MAX_LOG_Q`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Final, Literal, get_args

from secagg.errors import ConfigurationError, InfeasibleParameters
from secagg.quantize import headroom_bits_for, lane_bits_for, weight_bits_for

__all__ = [
    "ERROR_VARIANCE",
    "HE_STANDARD_MAX_LOG_Q",
    "MAX_PRIME_BITS",
    "ROUNDING_TOLERANCE",
    "TAIL_SIGMAS",
    "HEParams",
    "Mode",
    "float_error",
    "max_value_bits",
    "noise_bound",
    "noise_sigma",
    "select_params",
]

Mode = Literal["ckks", "hybrid"]
_MODES: Final = get_args(Mode)

HE_STANDARD_MAX_LOG_Q: Final[dict[int, int]] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}
"""Largest total ``log2 q`` per ring degree ``N`` for 128-bit classical security with ternary
secrets: Albrecht et al., *Homomorphic Encryption Security Standard*, HomomorphicEncryption.org,
2018, Table 1 (SEAL's ``CoeffModulus::MaxBitCount(N, sec_level_type::tc128)``)."""

MAX_PRIME_BITS: Final = 60
"""SEAL coefficient-modulus primes are at most 60 bits (``SEAL_USER_MOD_BIT_COUNT_MAX``)."""

MIN_PRIME_BITS: Final = 2
"""SEAL coefficient-modulus primes are at least 2 bits (``SEAL_USER_MOD_BIT_COUNT_MIN``)."""

ERROR_VARIANCE: Final = 10.5
"""Variance of SEAL's encryption error: a centered binomial of 21 + 21 bits, variance 21/2
(sigma ~= 3.24; SEAL 4 ``util/rlwe.cpp`` ``sample_poly_cbd``; the HE standard assumes
sigma ~= 3.2)."""

ENCODE_VARIANCE: Final = 1.0 / 12.0
"""Variance of the encoder's rounding of each coefficient to an integer (uniform on [-1/2, 1/2])."""

TAIL_SIGMAS: Final = 9.4
"""Noise bound in standard deviations: a Gaussian exceeds 9.4 sigma with probability
``erfc(9.4 / sqrt 2) ~= 2^-67`` per slot value."""

ROUNDING_TOLERANCE: Final = 0.25
"""Decrypted slot values must lie within this distance of an integer, else decryption fails.
Parameters keep the noise below it with probability ``1 - 2^-67`` per value, and a wrong
rounding needs noise above 0.5, twice the bound (``~2^-250``)."""

FLOAT_MANTISSA_BITS: Final = 53
"""IEEE 754 binary64: SEAL's CKKS encoder and decoder compute in double precision."""

CIPHERTEXT_OVERHEAD_BYTES: Final = 224
"""Measured overhead of a serialized SEAL 4 ciphertext beyond its coefficient words (header,
parms_id, metadata, the 64-byte seed of a seeded ciphertext); used for size reports only."""

WEIGHT_LIMIT: Final = 1 << 32
"""Largest ``max_weight`` accepted (weights are lane values, like :mod:`secagg.quantize`)."""

MAX_BITS: Final = 32
"""Quantization bits at most 32 (as :data:`secagg.quantize.MAX_BITS`)."""

SIZE_TIE: Final = 0.01
"""Uploads within 1% of the smallest count as equally small in :func:`select_params`."""

SLOT_WORD_BITS: Final = 63
"""Slot values travel as uint64: at most 63 bits (the float error bound keeps them far lower)."""


def _ceil_log2(x: int) -> int:
    return (x - 1).bit_length() if x > 1 else 0


def _data_log2_q_min(coeff_mod_bit_sizes: tuple[int, ...]) -> int:
    """``floor(log2)`` lower bound of the data-level modulus (all primes but a special one)."""
    data = coeff_mod_bit_sizes if len(coeff_mod_bit_sizes) == 1 else coeff_mod_bit_sizes[:-1]
    return sum(b - 1 for b in data)


def noise_sigma(poly_modulus_degree: int, terms: int) -> float:
    """Standard deviation, in coefficient units, of the real (or imaginary) part of a slot's error.

    Parameters
    ----------
    poly_modulus_degree:
        Ring degree ``N``.
    terms:
        Number of fresh ciphertexts summed (one more plaintext addend is always allowed for).
    """
    per_coeff = terms * (ERROR_VARIANCE + ENCODE_VARIANCE) + ENCODE_VARIANCE
    return math.sqrt(poly_modulus_degree / 2 * per_coeff)


def float_error(poly_modulus_degree: int, value_bits: int) -> float:
    """Bound on the double-precision error of encoding then decoding values below ``2^value_bits``.

    Converting coefficients to doubles errs by ``2^-53 |c_k|``; by Parseval
    ``sum |c_k| <= sqrt(N) max|z| Delta`` with ``max|z| < sqrt(2) 2^value_bits``. The FFT adds
    about ``log2 N`` roundings of the same order (counted four times over). Measured errors are
    ten times below this bound (``docs/ckks.md``).
    """
    n = poly_modulus_degree
    scale = math.sqrt(2.0) * 2.0 ** (value_bits - FLOAT_MANTISSA_BITS)
    return scale * (math.sqrt(n) + 4 * math.log2(n))


def noise_bound(poly_modulus_degree: int, scale_bits: int, terms: int, value_bits: int) -> float:
    """Bound (``TAIL_SIGMAS`` sigma plus the float error) on how far, in slot units, a
    decrypted sum of ``terms`` ciphertexts and one plaintext lies from its integer value."""
    sigma = noise_sigma(poly_modulus_degree, terms)
    return TAIL_SIGMAS * sigma / 2.0**scale_bits + float_error(poly_modulus_degree, value_bits)


def max_value_bits(
    poly_modulus_degree: int, coeff_mod_bit_sizes: tuple[int, ...], scale_bits: int, terms: int
) -> int:
    """Exact bits per slot value: the largest ``B`` with every sum of ``terms`` values below
    ``2^B`` decrypting within :data:`ROUNDING_TOLERANCE` (0 when none)."""
    cap = math.floor(_data_log2_q_min(coeff_mod_bit_sizes) - 1.5 - scale_bits)
    for b in range(min(cap, SLOT_WORD_BITS), 0, -1):
        if noise_bound(poly_modulus_degree, scale_bits, terms, b) <= ROUNDING_TOLERANCE:
            return b
    return 0


@dataclass(frozen=True)
class HEParams:
    """One CKKS parameter set and lane layout for exact integer aggregation.

    Build it with :func:`select_params`; the constructor re-checks security and correctness,
    so every instance is safe to use.

    Parameters
    ----------
    mode:
        ``"ckks"``: lanes carry plain quantized values. ``"hybrid"``: the packed slot value is
        masked modulo ``2^mask_bits`` (masks cancel in the sum, see :attr:`mask_bits`).
    n_clients:
        Largest number of ciphertexts summed (sets lane headroom and noise).
    bits:
        Quantization bits per value.
    dim:
        Parameters per client vector.
    max_weight:
        Largest client weight; ``1`` means unweighted (no weight lane).
    poly_modulus_degree:
        Ring degree ``N``; a ciphertext carries ``N`` slot values.
    coeff_mod_bit_sizes:
        Bit sizes of the coefficient-modulus primes (one prime: no key switching).
    scale_bits:
        ``log2`` of the CKKS scale ``Delta``.
    lanes_per_slot:
        Lanes packed in one slot value.
    """

    mode: Mode
    n_clients: int
    bits: int
    dim: int
    max_weight: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    lanes_per_slot: int

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ConfigurationError(f"mode must be one of {_MODES}, got {self.mode!r}")
        for name in ("n_clients", "bits", "dim", "max_weight", "scale_bits", "lanes_per_slot"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if self.bits > MAX_BITS:
            raise ConfigurationError(f"bits must be in 1..{MAX_BITS}, got {self.bits}")
        if self.max_weight > WEIGHT_LIMIT:
            raise ConfigurationError(f"max_weight must be at most 2^32, got {self.max_weight}")
        n = self.poly_modulus_degree
        if n not in HE_STANDARD_MAX_LOG_Q:
            raise InfeasibleParameters(
                f"poly_modulus_degree must be one of {sorted(HE_STANDARD_MAX_LOG_Q)} "
                f"(HE standard Table 1), got {n}"
            )
        sizes = self.coeff_mod_bit_sizes
        if not isinstance(sizes, tuple) or not sizes:
            raise ConfigurationError("coeff_mod_bit_sizes must be a non-empty tuple of ints")
        if any(not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS for b in sizes):
            raise ConfigurationError(
                f"coefficient primes must have {MIN_PRIME_BITS}..{MAX_PRIME_BITS} bits, got {sizes}"
            )
        if sum(sizes) > HE_STANDARD_MAX_LOG_Q[n]:
            raise InfeasibleParameters(
                f"N={n} with coefficient modulus {sizes} has log2 q = {sum(sizes)} > "
                f"{HE_STANDARD_MAX_LOG_Q[n]}, the 128-bit limit of the HomomorphicEncryption.org "
                "standard (Table 1, classical, ternary secret)"
            )
        bound = noise_bound(n, self.scale_bits, self.terms, self.value_bits)
        if self.value_bits < 1 or bound > ROUNDING_TOLERANCE:
            raise InfeasibleParameters(
                f"scale 2^{self.scale_bits} with N={n}, q of {sizes} bits and {self.terms} "
                f"summands leaves no exact bit (noise bound {bound:.3g} > {ROUNDING_TOLERANCE})"
            )
        needed = self.slot_sum_bits
        if needed > self.value_bits:
            raise InfeasibleParameters(
                f"{self.lanes_per_slot} lanes of {self.lane_bits} bits"
                + (f" + {self.carry_bits} carry bits" if self.mode == "hybrid" else "")
                + f" need {needed} exact bits per slot but N={n}, q of {sizes} bits, scale "
                f"2^{self.scale_bits} keep {self.value_bits} after {self.terms} summands"
            )

    # --- lane layout ----------------------------------------------------------------------

    @property
    def weighted(self) -> bool:
        """Whether values carry a weight (``max_weight > 1``), as in :mod:`secagg.quantize`."""
        return self.max_weight > 1

    @property
    def weight_bits(self) -> int:
        """Bits taken by the weight factor in ``w * q`` (0 when unweighted)."""
        return weight_bits_for(self.max_weight)

    @property
    def headroom_bits(self) -> int:
        """``ceil(log2 n)``: the lane-wise sum of ``n`` values never leaves its lane."""
        return headroom_bits_for(self.n_clients)

    @property
    def lane_bits(self) -> int:
        """Width ``L`` of one lane, the same as ``QuantSpec.lane_bits``."""
        return lane_bits_for(self.bits, self.n_clients, self.max_weight)

    @property
    def max_lane_value(self) -> int:
        """Largest value one client may put in a lane: ``max_weight * (2^bits - 1)``."""
        return self.max_weight * ((1 << self.bits) - 1)

    @property
    def slot_value_bits(self) -> int:
        """Bits of one client's slot value: ``lanes_per_slot * lane_bits``."""
        return self.lanes_per_slot * self.lane_bits

    @property
    def mask_bits(self) -> int:
        """Hybrid mode: slot values are masked modulo ``2^mask_bits`` (0 in ckks mode).

        Masks cancel modulo ``2^mask_bits``; the lane-wise sums fit in their lanes, so the sum
        reduced modulo ``2^mask_bits`` is exactly the packed vector of lane sums.
        """
        return self.slot_value_bits if self.mode == "hybrid" else 0

    @property
    def carry_bits(self) -> int:
        """Hybrid mode: ``ceil(log2(n + 1))`` bits above the mask modulus hold the carries of
        summing ``n`` masked slot values and one plaintext addend (0 in ckks mode)."""
        return _ceil_log2(self.n_clients + 1) if self.mode == "hybrid" else 0

    @property
    def slot_sum_bits(self) -> int:
        """Bits the decrypted sum of a slot needs: ``slot_value_bits + carry_bits``."""
        return self.slot_value_bits + self.carry_bits

    @property
    def terms(self) -> int:
        """Fresh ciphertexts in a sum (the plaintext addend is counted in :func:`noise_sigma`)."""
        return self.n_clients

    @cached_property
    def value_bits(self) -> int:
        """Exact bits per slot value that survive :attr:`terms` additions."""
        return max_value_bits(
            self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits, self.terms
        )

    # --- sizes ----------------------------------------------------------------------------

    @property
    def n_values(self) -> int:
        """Lane values per client: ``dim`` plus the weight lane when weighted."""
        return self.dim + (1 if self.weighted else 0)

    @property
    def n_slots(self) -> int:
        """Slot values per client vector: ``ceil(n_values / lanes_per_slot)``."""
        return -(-self.n_values // self.lanes_per_slot)

    @property
    def slots_per_ciphertext(self) -> int:
        """Slot values per ciphertext: ``N/2`` complex slots, real and imaginary parts."""
        return self.poly_modulus_degree

    @property
    def n_ciphertexts(self) -> int:
        """Ciphertexts per client vector."""
        return -(-self.n_slots // self.slots_per_ciphertext)

    @property
    def data_primes(self) -> int:
        """Primes in the data-level modulus (all but the special prime, if any)."""
        return max(1, len(self.coeff_mod_bit_sizes) - 1)

    @property
    def scale(self) -> float:
        """The CKKS scale ``Delta = 2^scale_bits``."""
        return float(2**self.scale_bits)

    def _raw_bytes(self, *, seeded: bool) -> int:
        polys = 1 if seeded else 2
        return 8 * self.poly_modulus_degree * self.data_primes * polys

    def ciphertext_bytes_range(self, *, seeded: bool) -> tuple[int, int]:
        """Accepted length ``(low, high)`` of one serialized ciphertext.

        ``seeded=True``: a client upload (``c1`` replaced by its PRNG seed); ``False``: a sum.
        SEAL compresses with zstd; uniformly random residues of ``b``-bit primes compress to no
        less than ``b/64`` of their 64-bit words, and zstd expands by at most ``1/128``.
        """
        raw = self._raw_bytes(seeded=seeded)
        data = self.coeff_mod_bit_sizes[: self.data_primes]
        density = min(data) / 64.0
        low = math.floor(0.9 * raw * density)
        high = raw + raw // 128 + 1024
        return low, high

    def nominal_ciphertext_bytes(self, *, seeded: bool) -> int:
        """Typical serialized size of one ciphertext (for reports; measured, not a bound)."""
        return self._raw_bytes(seeded=seeded) + CIPHERTEXT_OVERHEAD_BYTES

    @property
    def upload_bytes(self) -> int:
        """Typical bytes one client uploads: :attr:`n_ciphertexts` seeded ciphertexts."""
        return self.n_ciphertexts * self.nominal_ciphertext_bytes(seeded=True)

    @property
    def bytes_per_parameter(self) -> float:
        """Typical upload bytes per model parameter."""
        return self.upload_bytes / self.dim

    @property
    def noise_bound(self) -> float:
        """Noise bound of a full sum, in slot units (at most :data:`ROUNDING_TOLERANCE`)."""
        return noise_bound(self.poly_modulus_degree, self.scale_bits, self.terms, self.value_bits)

    # --- transport ------------------------------------------------------------------------

    def to_json(self) -> bytes:
        """Canonical JSON bytes (for worker messages and configuration files)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> HEParams:
        """Inverse of :meth:`to_json`; re-validates everything.

        Raises
        ------
        ConfigurationError
            If ``data`` is not a parameter set.
        """
        try:
            raw = json.loads(data)
            raw["coeff_mod_bit_sizes"] = tuple(raw["coeff_mod_bit_sizes"])
            return cls(**raw)
        except ConfigurationError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigurationError(f"not an HE parameter set: {exc}") from None

    def describe(self) -> str:
        """One-line human summary."""
        return (
            f"{self.mode}: N={self.poly_modulus_degree} q={list(self.coeff_mod_bit_sizes)} "
            f"scale=2^{self.scale_bits} value_bits={self.value_bits} "
            f"{self.lanes_per_slot}x{self.lane_bits}-bit lanes/slot, {self.n_ciphertexts} ct, "
            f"{self.bytes_per_parameter:.2f} B/param"
        )


def _best_for_degree(
    n: int, mode: Mode, n_clients: int, bits: int, dim: int, max_weight: int
) -> HEParams | None:
    """The parameter set with the most lanes per slot at ring degree ``n`` (or ``None``)."""
    prime_bits = min(MAX_PRIME_BITS, HE_STANDARD_MAX_LOG_Q[n])
    sizes = (prime_bits,)
    probe = _layout_probe(mode, n_clients, bits, max_weight)
    lane_bits, carry = probe
    values = dim + (1 if max_weight > 1 else 0)
    best: HEParams | None = None
    for scale_bits in range(1, prime_bits):
        vbits = max_value_bits(n, sizes, scale_bits, n_clients)
        lanes = min((vbits - carry) // lane_bits, values)
        if lanes < 1:
            continue
        if best is None or lanes >= best.lanes_per_slot:  # same lanes: larger noise margin
            best = HEParams(mode, n_clients, bits, dim, max_weight, n, sizes, scale_bits, lanes)
    return best


def _layout_probe(mode: Mode, n_clients: int, bits: int, max_weight: int) -> tuple[int, int]:
    lane_bits = lane_bits_for(bits, n_clients, max_weight)
    carry = _ceil_log2(n_clients + 1) if mode == "hybrid" else 0
    return lane_bits, carry


def select_params(n_clients: int, bits: int, dim: int, mode: Mode, max_weight: int = 1) -> HEParams:
    """Choose the CKKS parameters that minimise the upload for ``dim`` parameters.

    Every power-of-two ``N`` of the HE standard is tried with one prime as large as allowed
    (60 bits from ``N = 4096``); for each, the scale maximising lanes per slot is kept, and
    the smallest upload wins; uploads within :data:`SIZE_TIE` of it count as ties, won by
    the larger ``N`` (fewer ciphertexts: the server's cost is mostly per ciphertext). Among
    scales giving the same lanes the largest is kept: the value bound is exact, the noise
    bound statistical.

    Raises
    ------
    ConfigurationError
        If an argument is out of range.
    InfeasibleParameters
        If no 128-bit-secure set sums ``n_clients`` inputs exactly.
    """
    if mode not in _MODES:
        raise ConfigurationError(f"mode must be one of {_MODES}, got {mode!r}")
    for name, value in (("n_clients", n_clients), ("bits", bits), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ConfigurationError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if not isinstance(max_weight, int) or not 1 <= max_weight <= WEIGHT_LIMIT:
        raise ConfigurationError(f"max_weight must be in 1..2^32, got {max_weight!r}")
    candidates = [
        p
        for n in sorted(HE_STANDARD_MAX_LOG_Q)
        if (p := _best_for_degree(n, mode, n_clients, bits, dim, max_weight)) is not None
    ]
    if not candidates:
        lane_bits, carry = _layout_probe(mode, n_clients, bits, max_weight)
        top = max(
            max_value_bits(n, (min(MAX_PRIME_BITS, lq),), s, n_clients)
            for n, lq in HE_STANDARD_MAX_LOG_Q.items()
            for s in range(1, min(MAX_PRIME_BITS, lq))
        )
        raise InfeasibleParameters(
            f"{mode} mode with {n_clients} clients and {bits}-bit values needs "
            f"{lane_bits + carry} exact bits per slot ({lane_bits}-bit lane"
            + (f" + {carry} carry bits" if carry else "")
            + f") but no 128-bit-secure CKKS parameter set keeps more than {top} bits exact "
            f"after {n_clients} additions; lower bits, max_weight or the number of clients"
        )
    smallest = min(p.upload_bytes for p in candidates)
    near = [p for p in candidates if p.upload_bytes <= smallest * (1 + SIZE_TIE)]
    return max(near, key=lambda p: (p.poly_modulus_degree, -p.upload_bytes))
