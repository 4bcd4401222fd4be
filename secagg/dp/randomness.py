"""Exact uniform integers from one keyed ChaCha20 stream (the only randomness of ``secagg.dp``).

Every sampler in :mod:`secagg.dp` reads its coins from a :class:`KeyStream`: the keystream of
:func:`secagg.prg.keystream_bytes` under a 256-bit key and a :class:`secagg.prg.Purpose`,
consumed strictly in order, eight bytes (one little-endian ``uint64`` word) per draw. The
samplers are deterministic functions of (key, purpose, parameters, count), so a noise vector
can be regenerated bit for bit by whoever learns its key (the dropout-robust noise of
:mod:`secagg.dp.xnoise` relies on that).

Uniform integers below ``m`` use rejection on whole words (no modulo bias): a word ``u`` is
accepted when ``u >= 2^64 mod m`` and then ``u mod m`` is exactly uniform.

The keystream is OpenSSL's ChaCha20 (RFC 8439, through ``cryptography``, as the mask streams
of :mod:`secagg.kernels.openssl`): 16-byte IV = 32-bit block counter 0, then the 96-bit
nonce. Its bytes are pycryptodome's (:func:`secagg.prg.keystream_bytes`) byte for byte,
tested, and about 5x faster on the development box (2.3 ms against 12 ms for the 8 MiB of
rounding coins at ``d' = 2^20``, docs/dp.md "Speed").
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from secagg.errors import ConfigurationError
from secagg.prg import KEY_BYTES, MAX_STREAM_BYTES, Purpose, nonce_for

__all__ = ["U64", "KeyStream"]

U64 = npt.NDArray[np.uint64]

_CHUNK_BYTES = 1 << 18
"""Keystream bytes made per OpenSSL call for long reads (256 KiB of zeros in, stays in L2)."""

_ZEROS = memoryview(bytes(_CHUNK_BYTES))
_SLACK_WORDS = 8
"""Spare output words ``update_into`` may ask for beyond its input (one ChaCha20 block)."""

MAX_VECTOR_MODULUS = 1 << 63
"""Vectorised uniform draws take moduli below 2^63 (larger ones use :meth:`KeyStream.below_int`)."""


class KeyStream:
    """Sequential reader of the ChaCha20 keystream (RFC 8439) for ``key`` and ``purpose``.

    Parameters
    ----------
    key:
        32-byte stream key (the output of :func:`secagg.prg.derive_key`, or a fresh seed from
        :func:`secagg.keys.random_seed`).
    purpose:
        Domain-separation tag, which sets the nonce exactly as :func:`secagg.prg.nonce_for`.

    Notes
    -----
    Word ``j`` read from a fresh stream equals word ``j`` of
    :func:`secagg.prg.keystream_u64` for the same key and purpose.
    """

    __slots__ = ("_cipher", "_used")

    def __init__(self, key: bytes, purpose: Purpose) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"DP stream keys are {KEY_BYTES} bytes, got {len(key)}")
        iv = bytes(4) + nonce_for(purpose)  # block counter 0 (LE32), then the RFC 8439 nonce
        self._cipher = Cipher(algorithms.ChaCha20(key, iv), None).encryptor()
        self._used = 0

    def __repr__(self) -> str:
        return f"KeyStream(used={self._used} bytes)"

    @property
    def bytes_used(self) -> int:
        """Keystream bytes consumed so far."""
        return self._used

    def _take(self, nbytes: int) -> None:
        if self._used + nbytes > MAX_STREAM_BYTES:
            raise ConfigurationError("DP keystream exhausted (2^32 - 1 ChaCha20 blocks)")
        self._used += nbytes

    def words(self, count: int) -> U64:
        """The next ``count`` keystream words as ``uint64``."""
        nbytes = 8 * count
        if nbytes <= 256:
            self._take(nbytes)
            raw = self._cipher.update(bytes(nbytes))
            return np.frombuffer(raw, dtype="<u8").astype(np.uint64, copy=False)
        out = np.empty(count + _SLACK_WORDS, dtype=np.uint64)
        self.words_into(out, count)
        return out[:count]

    def words_into(self, out: U64, count: int | None = None) -> None:
        """The next ``count`` (default ``out.size``) keystream words into ``out[:count]``
        (a contiguous ``uint64`` array; with fewer than 8 spare words after ``count`` the
        last partial chunk goes through a bounce buffer)."""
        count = out.size if count is None else count
        if out.dtype != np.uint64 or not out.flags.c_contiguous or not 0 <= count <= out.size:
            raise ConfigurationError("keystream words go into a contiguous uint64 array")
        nbytes = 8 * count
        self._take(nbytes)
        view = out.data.cast("B")
        spare = 8 * (out.size - count)
        for start in range(0, nbytes, _CHUNK_BYTES):
            width = min(_CHUNK_BYTES, nbytes - start)
            if start + width + 8 * _SLACK_WORDS <= nbytes + spare:
                self._cipher.update_into(_ZEROS[:width], view[start:])
            else:  # no room for the slack update_into may want: bounce
                view[start : start + width] = self._cipher.update(bytes(_ZEROS[:width]))
        if sys.byteorder == "big":  # the words are little-endian (module docstring)
            out[:count].byteswap(inplace=True)

    def below(self, m: U64) -> U64:
        """One exactly uniform integer in ``[0, m_i)`` per element ``1 <= m_i < 2^63`` of ``m``."""
        m = np.asarray(m, dtype=np.uint64)
        if m.size == 0:
            return np.zeros(0, dtype=np.uint64)
        if int(m.min()) < 1 or int(m.max()) >= MAX_VECTOR_MODULUS:
            raise ConfigurationError("uniform draws need moduli in [1, 2^63)")
        # 2^64 mod m, computed as (2^64 - m) mod m in wrapping uint64 arithmetic.
        threshold = (np.uint64(0) - m) % m
        out = np.empty(m.shape, dtype=np.uint64)
        todo = np.arange(m.size)
        while todo.size:
            u = self.words(todo.size)
            ok = u >= threshold[todo]
            out[todo[ok]] = u[ok] % m[todo[ok]]
            todo = todo[~ok]
        return out

    def below_scalar(self, m: int, count: int) -> U64:
        """``count`` exactly uniform integers in ``[0, m)`` for one modulus ``1 <= m < 2^63``."""
        return self.below(np.full(count, m, dtype=np.uint64))

    def below_int(self, m: int) -> int:
        """One exactly uniform Python integer in ``[0, m)``, any ``m >= 1`` (the slow path)."""
        if m < 1:
            raise ConfigurationError("uniform draws need a modulus >= 1")
        k = max(1, (m.bit_length() + 63) // 64)
        span = 1 << (64 * k)
        limit = span - span % m
        while True:
            w = self.words(k)
            u = int.from_bytes(w.astype("<u8").tobytes(), "little")
            if u < limit:
                return u % m
