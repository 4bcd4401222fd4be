"""Numpy/pycryptodome reference backend: obviously right, slow. Every kernel must match it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from secagg.prg import StreamMask, keystream_u64
from secagg.quantize import QuantSpec, encode

__all__ = ["add_masks", "mask_vector"]


def add_masks(acc: npt.NDArray[np.uint64], masks: Sequence[StreamMask]) -> None:
    """In place: ``acc += sum(sign * PRG(key, purpose)) mod 2^64`` over ``acc.size`` words."""
    for m in masks:
        stream = keystream_u64(m.key, m.purpose, acc.size)
        if m.sign > 0:
            acc += stream
        else:
            acc -= stream


def mask_vector(
    x: npt.ArrayLike,
    weight: int,
    spec: QuantSpec,
    rounding_key: bytes,
    masks: Sequence[StreamMask],
) -> npt.NDArray[np.uint64]:
    """Quantize, weight, pack and mask one update: ``encode(x) + sum(+-PRG) mod 2^64``."""
    words = encode(x, weight, spec, rounding_key)
    add_masks(words, masks)
    return words
