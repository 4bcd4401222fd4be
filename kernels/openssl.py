"""Mask streams from OpenSSL's ChaCha20, summed into the words with numpy (CPU backend).

OpenSSL's ChaCha20 (RFC 8439, through ``cryptography``) uses the CPU's widest vector unit
and on the 2-core development box makes keystream about 9x faster per core than the Numba
kernel of :mod:`secagg.kernels.cpu`; adding it mod 2^64 is one numpy pass. So the CPU
backend expands every self and pairwise mask here, chunk by chunk (a chunk of words stays in
cache while every mask's keystream for it is made and added), after the Numba kernel has
quantized, packed and rounded. Bits are those of :mod:`secagg.kernels.reference`: stream
``purpose`` under ``key``, block counter from 0, word ``j`` = keystream bytes ``8j .. 8j+7``
little-endian (``tests/test_kernels.py`` compares them).

OpenSSL's ChaCha20 takes a 16-byte IV: the 32-bit block counter (little-endian) followed by
the 96-bit RFC 8439 nonce; the counter starts at 0 here. Callers check the stream length
against :data:`secagg.prg.MAX_STREAM_BYTES` first, so the counter never wraps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from secagg.prg import StreamMask, nonce_for

__all__ = ["CHUNK_WORDS", "add_masks"]

CHUNK_WORDS = 1 << 15
"""Words per chunk (256 KiB): the chunk of ``acc`` and one keystream buffer stay in L2."""

_ZEROS = bytes(8 * CHUNK_WORDS)
_SLACK = 64
"""Spare output bytes ``update_into`` may ask for beyond the input (one block)."""


def add_masks(acc: npt.NDArray[np.uint64], masks: Sequence[StreamMask]) -> None:
    """In place: ``acc += sum(sign * PRG(key, purpose))`` mod 2^64 (``sign > 0`` adds, any
    other sign subtracts, as the reference). Trusts its arguments (see
    :func:`secagg.kernels.api.add_masks`)."""
    n = int(acc.size)
    if not n or not masks:
        return
    streams = [
        (
            Cipher(algorithms.ChaCha20(m.key, bytes(4) + nonce_for(m.purpose)), None).encryptor(),
            m.sign > 0,
        )
        for m in masks
    ]
    buf = bytearray(8 * CHUNK_WORDS + _SLACK)
    zeros = memoryview(_ZEROS)
    for start in range(0, n, CHUNK_WORDS):
        stop = min(n, start + CHUNK_WORDS)
        width = stop - start
        part = acc[start:stop]
        words = np.frombuffer(buf, dtype="<u8", count=width)
        for enc, plus in streams:
            enc.update_into(zeros[: 8 * width], buf)
            if plus:
                np.add(part, words, out=part)
            else:
                np.subtract(part, words, out=part)
