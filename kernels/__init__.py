"""Bulk math for secure aggregation: quantize, pack, mask and unmask.

The protocol core calls only this API for bulk math. Backends: ``reference`` (numpy and
pycryptodome, :mod:`secagg.kernels.reference`), Numba CPU (:mod:`secagg.kernels.cpu`) and
CUDA (:mod:`secagg.kernels.cuda`) kernels behind the same functions, chosen per call by
:mod:`secagg.kernels.api` (``SECAGG_KERNELS=auto|cpu|cuda|reference``). All give the same
bits. Importing this package does not import Numba; kernels compile on first use.
"""

from __future__ import annotations

from secagg.kernels.api import (
    add_masks,
    check_device_vector,
    dequantize,
    is_device_array,
    keystream,
    mask_vector,
    to_host,
    unpack,
)

__all__ = [
    "add_masks",
    "check_device_vector",
    "dequantize",
    "is_device_array",
    "keystream",
    "mask_vector",
    "to_host",
    "unpack",
]
