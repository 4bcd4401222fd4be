"""ChaCha20 block function (RFC 8439) shared by the Numba CPU and CUDA kernels.

The jitted functions here are written once as scalar code on ``uint32`` values and
registered with :func:`numba.extending.register_jitable`, so the same source compiles for
``@njit`` (CPU, where :mod:`secagg.kernels.cpu` runs it in a loop over 16 blocks that LLVM
vectorises) and for ``@cuda.jit`` (one block per thread, state in registers), and runs as
plain Python under the CUDA simulator.

Numba widens ``uint32 + uint32`` to 64 bits; every add and rotate is therefore wrapped back
with ``uint32(...)`` (the rotate's left shift would otherwise keep the bits it must drop).

Stream layout (as :mod:`secagg.prg`): 32-byte key, 12-byte nonce, 32-bit block counter from
0; keystream byte ``64 * b + i`` is byte ``i`` of block ``b``; words are little-endian.

This module imports Numba: import it lazily (the backends do).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import uint32
from numba.extending import register_jitable

from secagg.errors import ConfigurationError
from secagg.prg import KEY_BYTES, MAX_STREAM_BYTES, StreamMask, nonce_for

__all__ = [
    "BLOCK_BYTES",
    "BLOCK_WORDS",
    "NONCE_BYTES",
    "SIGMA",
    "chacha20_block",
    "chacha20_block_inline",
    "check_range",
    "key_words",
    "mask_params",
    "nonce_words",
    "quarter_round",
]

BLOCK_BYTES = 64
"""Bytes per ChaCha20 block (RFC 8439 section 2.3)."""

BLOCK_WORDS = 16
"""32-bit words per ChaCha20 block: the 4x4 state (RFC 8439 section 2.3)."""

NONCE_BYTES = 12
"""RFC 8439 section 2.3 nonce: 96 bits after a 32-bit block counter."""

MAX_BLOCKS = MAX_STREAM_BYTES // 64
"""Blocks in one stream: counters 0 .. 2^32 - 2 (:data:`secagg.prg.MAX_STREAM_BYTES`)."""

SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
"""State words 0-3, ``"expand 32-byte k"`` little-endian (RFC 8439 section 2.3)."""

_S0, _S1, _S2, _S3 = SIGMA


@register_jitable
def quarter_round(a: Any, b: Any, c: Any, d: Any) -> Any:
    """The ChaCha quarter round (RFC 8439 section 2.1) on four ``uint32`` values."""
    a = uint32(a + b)
    d = d ^ a
    d = uint32((d << 16) | (d >> 16))
    c = uint32(c + d)
    b = b ^ c
    b = uint32((b << 12) | (b >> 20))
    a = uint32(a + b)
    d = d ^ a
    d = uint32((d << 8) | (d >> 24))
    c = uint32(c + d)
    b = b ^ c
    b = uint32((b << 7) | (b >> 25))
    return a, b, c, d


@register_jitable
def _double_round(
    x0: Any, x1: Any, x2: Any, x3: Any, x4: Any, x5: Any, x6: Any, x7: Any,
    x8: Any, x9: Any, x10: Any, x11: Any, x12: Any, x13: Any, x14: Any, x15: Any,
) -> Any:  # fmt: skip
    """Column round then diagonal round (RFC 8439 section 2.3, ``inner_block``)."""
    x0, x4, x8, x12 = quarter_round(x0, x4, x8, x12)
    x1, x5, x9, x13 = quarter_round(x1, x5, x9, x13)
    x2, x6, x10, x14 = quarter_round(x2, x6, x10, x14)
    x3, x7, x11, x15 = quarter_round(x3, x7, x11, x15)
    x0, x5, x10, x15 = quarter_round(x0, x5, x10, x15)
    x1, x6, x11, x12 = quarter_round(x1, x6, x11, x12)
    x2, x7, x8, x13 = quarter_round(x2, x7, x8, x13)
    x3, x4, x9, x14 = quarter_round(x3, x4, x9, x14)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


def _chacha20_block(keys: Any, row: Any, counter: Any, nonces: Any) -> Any:
    """One ChaCha20 block (RFC 8439 section 2.3) as a 16-tuple of ``uint32`` words.

    Parameters
    ----------
    keys:
        ``(k, 8)`` uint32 array of keys as little-endian words.
    row:
        Which key (and nonce) to use.
    counter:
        32-bit block counter (``uint32``).
    nonces:
        ``(k, 3)`` uint32 array of nonces as little-endian words.

    The ten double rounds are written out so the body is straight-line code: LLVM then
    vectorises a loop over consecutive blocks on the CPU, and NVVM keeps the state in
    registers on the GPU.
    """
    j0 = uint32(_S0)
    j1 = uint32(_S1)
    j2 = uint32(_S2)
    j3 = uint32(_S3)
    j4 = uint32(keys[row, 0])
    j5 = uint32(keys[row, 1])
    j6 = uint32(keys[row, 2])
    j7 = uint32(keys[row, 3])
    j8 = uint32(keys[row, 4])
    j9 = uint32(keys[row, 5])
    j10 = uint32(keys[row, 6])
    j11 = uint32(keys[row, 7])
    j12 = uint32(counter)
    j13 = uint32(nonces[row, 0])
    j14 = uint32(nonces[row, 1])
    j15 = uint32(nonces[row, 2])
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = (
        j0, j1, j2, j3, j4, j5, j6, j7, j8, j9, j10, j11, j12, j13, j14, j15
    )  # fmt: skip
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _double_round(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15
    )
    # RFC 8439 section 2.3: add the original input words to the output of the rounds.
    return (
        uint32(x0 + j0),
        uint32(x1 + j1),
        uint32(x2 + j2),
        uint32(x3 + j3),
        uint32(x4 + j4),
        uint32(x5 + j5),
        uint32(x6 + j6),
        uint32(x7 + j7),
        uint32(x8 + j8),
        uint32(x9 + j9),
        uint32(x10 + j10),
        uint32(x11 + j11),
        uint32(x12 + j12),
        uint32(x13 + j13),
        uint32(x14 + j14),
        uint32(x15 + j15),
    )


def _twin(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A second function object with ``fn``'s code, so it can be registered separately."""
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)


chacha20_block = register_jitable(_twin(_chacha20_block))
"""The block function for CUDA kernels (NVVM inlines it) and the simulator (plain Python)."""

chacha20_block_inline = register_jitable(inline="always")(_twin(_chacha20_block))
"""The same block function, inlined into the caller at Numba IR level: for CPU kernels.

LLVM's inliner leaves a callee this large as a call, and a loop with a call in it does not
vectorise; numba-cuda cannot IR-inline it (its typing of the inlined body fails), hence two
registrations of one source.
"""


# --- host-side helpers (plain Python) --------------------------------------------------------


def key_words(key: bytes) -> npt.NDArray[np.uint32]:
    """A 32-byte key as 8 little-endian uint32 words (RFC 8439 section 2.3 state words 4-11).

    Raises
    ------
    ConfigurationError
        If ``key`` is not 32 bytes (the same error as :func:`secagg.prg.keystream_bytes`).
    """
    if not isinstance(key, (bytes, bytearray, memoryview)) or len(key) != KEY_BYTES:
        raise ConfigurationError("ChaCha20 keys are 32 bytes")
    return np.frombuffer(bytes(key), dtype="<u4").astype(np.uint32)


def nonce_words(nonce: bytes) -> npt.NDArray[np.uint32]:
    """A 12-byte nonce as 3 little-endian uint32 words (RFC 8439 section 2.3 words 13-15)."""
    if not isinstance(nonce, (bytes, bytearray, memoryview)) or len(nonce) != NONCE_BYTES:
        raise ConfigurationError("ChaCha20 nonces are 12 bytes (RFC 8439)")
    return np.frombuffer(bytes(nonce), dtype="<u4").astype(np.uint32)


def check_range(offset: int, nbytes: int) -> None:
    """Reject a request beyond the stream's counter space, as :mod:`secagg.prg` does."""
    if nbytes < 0 or offset < 0 or offset + nbytes > MAX_STREAM_BYTES:
        raise ConfigurationError("keystream request outside the 2^32 - 1 block counter space")


def mask_params(
    masks: Sequence[StreamMask],
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
    """Pack stream masks into kernel arguments.

    Returns
    -------
    (keys, nonces, signs):
        ``(k, 8)`` and ``(k, 3)`` uint32 word arrays and ``(k,)`` int64 signs, ``+1`` where
        ``sign > 0`` and ``-1`` otherwise (the reference subtracts for any other sign).
    """
    k = len(masks)
    keys = np.empty((k, 8), dtype=np.uint32)
    nonces = np.empty((k, 3), dtype=np.uint32)
    signs = np.empty(k, dtype=np.int64)
    for i, m in enumerate(masks):
        keys[i] = key_words(m.key)
        nonces[i] = nonce_words(nonce_for(m.purpose))
        signs[i] = 1 if m.sign > 0 else -1
    return keys, nonces, signs
