"""DP ring values in masked words: lanes of ``b + ceil(log2 n)`` bits (docs/dp.md, "upload").

Each client's encoded update is ``d'`` values mod ``2^b``. Packed lane-major into uint64
words exactly as :func:`secagg.quantize.pack` packs quantized values, with lanes of
``L = b + ceil(log2 n)`` bits, the word-wise sum mod ``2^64`` of ``n`` packed vectors is the
packed vector of the lane-wise sums (no carry leaves a lane); the server reduces each lane
sum mod ``2^b``, which is the ring sum the DP pipeline defines.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from secagg.dp.policy import DPOffer
from secagg.dp.rotation import padded_dim
from secagg.errors import InfeasibleParameters
from secagg.quantize import WORD_BITS, headroom_bits_for

__all__ = ["dp_lane_bits", "dp_words", "pack_ring", "unpack_ring"]

U64 = npt.NDArray[np.uint64]


def dp_lane_bits(bits: int, n_clients: int) -> int:
    """``b + ceil(log2 n)``.

    Raises
    ------
    InfeasibleParameters
        If the lane does not fit a 64-bit word.
    """
    lane = bits + headroom_bits_for(n_clients)
    if bits < 1 or lane > WORD_BITS:
        raise InfeasibleParameters(
            f"a DP lane needs {bits} ring bits + {headroom_bits_for(n_clients)} headroom bits"
            f" = {lane} > {WORD_BITS}"
        )
    return lane


def dp_words(offer: DPOffer, n_clients: int) -> int:
    """Masked words of one DP upload: ``ceil(d' / floor(64 / L))``."""
    per = WORD_BITS // dp_lane_bits(offer.bits, n_clients)
    return -(-padded_dim(offer.dim) // per)


def pack_ring(values: U64, lane_bits: int, words: int) -> U64:
    """Pack ``values`` (each below ``2^lane_bits``) lane-major into ``words`` uint64 words.

    One Numba pass (:func:`secagg.kernels.dp_encode.pack_lanes`) for a flat ``uint64``
    vector that fits, bit for bit :func:`secagg.dp.reference.pack_ring`; numpy otherwise.
    """
    per = WORD_BITS // lane_bits
    v = np.asarray(values)
    if v.dtype == np.uint64 and v.ndim == 1 and v.size <= words * per and lane_bits <= WORD_BITS:
        from secagg.kernels.dp_encode import kernels, launch

        pack_lanes = kernels().pack_lanes

        out = np.empty(words, dtype=np.uint64)
        with launch():  # kernels/dp_encode.py: one region at a time, SECAGG_DP_THREADS
            pack_lanes(np.ascontiguousarray(v), lane_bits, out)
        return out
    padded = np.zeros(words * per, dtype=np.uint64)
    padded[: values.size] = values
    out = np.zeros(words, dtype=np.uint64)
    for lane in range(per):
        out |= padded[lane * words : (lane + 1) * words] << np.uint64(lane * lane_bits)
    return out


def unpack_ring(words: U64, lane_bits: int, count: int, bits: int) -> U64:
    """The first ``count`` lane values of ``words``, each reduced mod ``2^bits``."""
    per = WORD_BITS // lane_bits
    w = words.size
    out = np.empty(w * per, dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1) if bits < WORD_BITS else np.uint64(2**64 - 1)
    for lane in range(per):
        out[lane * w : (lane + 1) * w] = (words >> np.uint64(lane * lane_bits)) & mask
    return out[:count]
