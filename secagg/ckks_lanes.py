"""Lane encoding of the HE modes: pack quantized lanes into slot values, mask them (hybrid).

Integers only: slot values are uint64 vectors; see ``docs/ckks.md`` ("Encoding", "Hybrid
masking").
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from secagg.errors import ConfigurationError, InputError
from secagg.he_params import HEParams

__all__ = [
    "U64Array",
    "add_masks",
    "mask_modulus_bits",
    "masks_from_words",
    "negate_masks",
    "pack_lanes",
    "unmask_sum",
    "unpack_lanes",
]

U64Array = npt.NDArray[np.uint64]


def _as_u64(values: npt.ArrayLike, what: str) -> U64Array:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{what} must be a flat vector, got shape {arr.shape}")
    if arr.dtype == np.uint64:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must hold integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise InputError(f"{what} must be non-negative")
    return arr.astype(np.uint64)


def pack_lanes(values: npt.ArrayLike, params: HEParams) -> U64Array:
    """Pack ``params.n_values`` lane values into ``params.n_slots`` slot values, lane-major.

    With ``S`` slots, value ``j`` sits in slot ``j mod S`` at bit offset ``lane_bits * (j // S)``
    (the layout of :func:`secagg.quantize.pack` with ``lanes_per_slot`` lanes per word).

    Raises
    ------
    InputError
        If there are not ``n_values`` values, or one exceeds ``max_weight * (2^bits - 1)``.
    """
    v = _as_u64(values, "lane values")
    if v.size != params.n_values:
        raise InputError(f"expected {params.n_values} lane values, got {v.size}")
    if v.size and int(v.max()) > params.max_lane_value:
        raise InputError(f"lane values must be at most {params.max_lane_value}")
    slots = params.n_slots
    padded = np.zeros(slots * params.lanes_per_slot, dtype=np.uint64)
    padded[: v.size] = v
    out = np.zeros(slots, dtype=np.uint64)
    for lane in range(params.lanes_per_slot):
        out |= padded[lane * slots : (lane + 1) * slots] << np.uint64(lane * params.lane_bits)
    return out


def unpack_lanes(slots: npt.ArrayLike, params: HEParams, count: int | None = None) -> U64Array:
    """Inverse of :func:`pack_lanes`: the first ``count`` (default ``n_values``) lane values.

    Works on sums too (each lane sum fits its lane); in hybrid mode unmask first.
    """
    s = _as_u64(slots, "slot values")
    count = params.n_values if count is None else count
    per = params.lanes_per_slot
    if not 0 <= count <= s.size * per:
        raise ConfigurationError(f"{s.size} slots hold at most {s.size * per} values, not {count}")
    mask = np.uint64((1 << params.lane_bits) - 1)
    out = np.empty(s.size * per, dtype=np.uint64)
    for lane in range(per):
        out[lane * s.size : (lane + 1) * s.size] = (s >> np.uint64(lane * params.lane_bits)) & mask
    return out[:count]


def mask_modulus_bits(params: HEParams) -> int:
    """Hybrid mode: masks and masked slot values live modulo ``2^mask_modulus_bits(params)``.

    A whole slot value (``lanes_per_slot`` lanes) is masked at once, as the masked mode masks
    whole uint64 words: one carry headroom of ``ceil(log2(n + 1))`` bits per slot instead of
    one per lane.
    """
    if params.mode != "hybrid":
        raise ConfigurationError("masks exist in hybrid mode only")
    return params.mask_bits


def _mask_u64(params: HEParams) -> np.uint64:
    return np.uint64((1 << mask_modulus_bits(params)) - 1)


def masks_from_words(words: npt.ArrayLike, params: HEParams) -> U64Array:
    """Uniform masks modulo ``2^mask_bits`` from uniform uint64 words (e.g. a ChaCha20
    keystream of :func:`secagg.prg.keystream_u64`): the low ``mask_bits`` bits of each."""
    return _as_u64(words, "mask words") & _mask_u64(params)


def add_masks(slots: npt.ArrayLike, masks: npt.ArrayLike, params: HEParams) -> U64Array:
    """``(slots + masks) mod 2^mask_bits`` element-wise (uint64 wraps modulo 2^64 first)."""
    a, b = _as_u64(slots, "slot values"), _as_u64(masks, "masks")
    if a.shape != b.shape:
        raise InputError(f"slot values {a.shape} and masks {b.shape} differ in shape")
    return (a + b) & _mask_u64(params)


def negate_masks(masks: npt.ArrayLike, params: HEParams) -> U64Array:
    """``-masks mod 2^mask_bits``: what cancels ``masks`` in a sum."""
    return (np.uint64(0) - _as_u64(masks, "masks")) & _mask_u64(params)


def unmask_sum(slot_sums: npt.ArrayLike, params: HEParams) -> U64Array:
    """Reduce decrypted slot sums modulo ``2^mask_bits``: the masks cancel and, as no lane sum
    leaves its lane, what remains is the packed vector of lane sums."""
    return _as_u64(slot_sums, "slot sums") & _mask_u64(params)
