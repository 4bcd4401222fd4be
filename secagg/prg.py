"""Pseudorandom generator: ChaCha20 keystreams (RFC 8439) under HKDF-derived keys.

This module is the *reference* path (pycryptodome's ChaCha20; HKDF from OpenSSL through
``cryptography``). The Numba kernels in :mod:`secagg.kernels` must reproduce these streams
bit for bit.

Stream layout (fixed; see ``docs/protocol.md``):

* key: 32 bytes, always the output of :func:`derive_key` (HKDF-SHA256, RFC 5869) with the
  round's session id as salt and a purpose label plus participant ids as info;
* nonce: 12 bytes, ``purpose tag (1 byte) || 11 zero bytes`` (RFC 8439 section 2.3 layout:
  32-bit block counter followed by a 96-bit nonce);
* block counter starts at 0; word ``j`` of a ``uint64`` stream is bytes ``8j .. 8j+7`` of the
  keystream read little-endian; element ``j`` of a ``uint32`` stream is bytes ``4j .. 4j+3``.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from Crypto.Cipher import ChaCha20
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secagg.errors import ConfigurationError

__all__ = [
    "KEY_BYTES",
    "MAX_STREAM_BYTES",
    "Purpose",
    "StreamMask",
    "derive_key",
    "keystream_bytes",
    "keystream_u32",
    "keystream_u64",
    "nonce_for",
]

KEY_BYTES = 32
"""ChaCha20 key size in bytes (RFC 8439 section 2.3): all seeds and keys are 256-bit."""

BLOCK_BYTES = 64
"""ChaCha20 block size in bytes (RFC 8439 section 2.3)."""

MAX_STREAM_BYTES = BLOCK_BYTES * ((1 << 32) - 1)
"""One stream is block counters 0 .. 2^32 - 2 (just under 256 GiB).

RFC 8439 section 2.3 gives a 32-bit counter; pycryptodome 3.x refuses its last value, so
secagg never uses it and every stream can be checked against every pycryptodome release."""

_LABEL = b"secagg/v1/"


class Purpose(IntEnum):
    """Domain-separation tag: one per use of a keystream. Goes into the nonce and HKDF info."""

    SELF_MASK = 1
    PAIR_MASK = 2
    ROUNDING = 3
    GRAPH = 4
    HYBRID = 5
    SHARE_ENC = 6
    # Distributed DP (secagg.dp); tags kept apart from the masking ones above.
    DP_NOISE = 16
    DP_ROTATION = 17
    DP_ROUNDING = 18


_PURPOSE_LABEL = {
    Purpose.SELF_MASK: b"self-mask",
    Purpose.PAIR_MASK: b"pair-mask",
    Purpose.ROUNDING: b"rounding",
    Purpose.GRAPH: b"graph",
    Purpose.HYBRID: b"hybrid",
    Purpose.SHARE_ENC: b"share-enc",
    Purpose.DP_NOISE: b"dp-noise",
    Purpose.DP_ROTATION: b"dp-rotation",
    Purpose.DP_ROUNDING: b"dp-rounding",
}


def nonce_for(purpose: Purpose) -> bytes:
    """The 12-byte RFC 8439 nonce for ``purpose``: tag byte followed by 11 zero bytes."""
    return bytes([int(purpose)]) + bytes(11)


def derive_key(secret: bytes, session_id: bytes, purpose: Purpose, *ids: int) -> bytes:
    """Derive a 256-bit stream key with HKDF-SHA256 (RFC 5869).

    Parameters
    ----------
    secret:
        Input keying material: a 32-byte seed or an X25519 shared secret.
    session_id:
        The round's session id (salt), binding the key to this round.
    purpose:
        Domain separation label.
    ids:
        Participant ids (each a uint32) bound into the info string; for a pair mask the
        two ids in ascending order.
    """
    if len(secret) < KEY_BYTES:
        raise ConfigurationError("keying material must be at least 32 bytes")
    if any(not 0 <= i < 1 << 32 for i in ids):
        raise ConfigurationError("participant ids must be uint32")
    info = _LABEL + _PURPOSE_LABEL[purpose] + b"".join(struct.pack(">I", i) for i in ids)
    # OpenSSL's HKDF (15x faster than pycryptodome's, which the tests cross-check it with).
    return HKDF(SHA256(), KEY_BYTES, bytes(session_id), info).derive(bytes(secret))


def keystream_bytes(key: bytes, purpose: Purpose, nbytes: int, offset: int = 0) -> bytes:
    """``nbytes`` of ChaCha20 keystream for ``key`` and ``purpose`` starting at byte ``offset``."""
    if len(key) != KEY_BYTES:
        raise ConfigurationError("ChaCha20 keys are 32 bytes")
    if nbytes < 0 or offset < 0 or offset + nbytes > MAX_STREAM_BYTES:
        raise ConfigurationError("keystream request outside the 2^32 - 1 block counter space")
    cipher = ChaCha20.new(key=key, nonce=nonce_for(purpose))
    if offset:
        cipher.seek(offset)
    out = cipher.encrypt(bytes(nbytes))
    assert isinstance(out, bytes)
    return out


def keystream_u64(key: bytes, purpose: Purpose, count: int) -> npt.NDArray[np.uint64]:
    """``count`` little-endian uint64 words of keystream (the mask of a packed vector)."""
    return np.frombuffer(keystream_bytes(key, purpose, 8 * count), dtype="<u8").astype(
        np.uint64, copy=False
    )


def keystream_u32(key: bytes, purpose: Purpose, count: int) -> npt.NDArray[np.uint32]:
    """``count`` little-endian uint32 values of keystream (stochastic rounding draws)."""
    return np.frombuffer(keystream_bytes(key, purpose, 4 * count), dtype="<u4").astype(
        np.uint32, copy=False
    )


class StreamMask(NamedTuple):
    """One keystream to add (``sign=+1``) or subtract (``sign=-1``) mod 2^64 over a vector."""

    key: bytes
    purpose: Purpose
    sign: int
