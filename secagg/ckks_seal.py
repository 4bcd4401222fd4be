"""SEAL and TenSEAL serialization: SEAL objects to and from bytes, TenSEAL's context protobuf.

The SEAL bindings that ship with TenSEAL 0.3.18 (``tenseal.sealapi``) serialize through file
paths only, so objects pass through an anonymous in-memory file (``memfd``, one per thread and
process). TenSEAL's context format is the protobuf ``TenSEALContextProto``
(``tenseal/proto/tensealcontext.proto``, shipped in TenSEAL's wheel); the few fields used
here are read and written by hand, with the field numbers copied from that file. (A reader
generated from it, like ``service/_gen``, is still to do: the generator, grpcio-tools, lives
in the Flower environment.)
"""

from __future__ import annotations

import atexit
import os
import struct
import tempfile
import threading
from typing import Any, Final

import tenseal as ts

from secagg.errors import ConfigurationError, CryptoError

__all__ = ["N_THREADS", "SEAL_COMPR_MODES", "SEAL_HEADER", "SEAL_MAGIC"]

N_THREADS: Final = 1
"""TenSEAL thread-pool size of every context (its pool corrupts memory when embedded)."""

SEAL_MAGIC: Final = 0xA15E
"""``seal::Serialization::seal_magic``: first two bytes (little-endian) of a SEAL object."""

SEAL_HEADER: Final = struct.Struct("<HBBBBHQ")
"""``seal::Serialization::SEALHeader``: magic, header size, version major, version minor,
compression mode, reserved, total size (SEAL 4 ``serialization.h``)."""

SEAL_COMPR_MODES: Final = frozenset({0, 1, 2})
"""``compr_mode_type``: none, zlib, zstd."""

_SYMMETRIC: Final = int(ts.ENCRYPTION_TYPE.SYMMETRIC.value)

# TenSEALContextProto field numbers (tenseal/proto/tensealcontext.proto).
_CTX_PARMS, _CTX_PUBLIC, _CTX_PRIVATE, _CTX_ENC_TYPE = 1, 2, 3, 4
_PUB_PUBLIC_KEY, _PUB_AUTO_FLAGS, _PUB_SCALE, _PUB_RELIN, _PUB_GALOIS = 1, 2, 3, 4, 5
_PRIV_SECRET_KEY, _PRIV_RELIN_FLAG, _PRIV_GALOIS_FLAG = 1, 2, 3

_SEAL_ERRORS: Final = (ValueError, RuntimeError, IndexError, TypeError, OverflowError, MemoryError)
"""What pybind11 turns SEAL's C++ exceptions into."""


# --- SEAL objects to and from bytes ---------------------------------------------------------


class _MemFile:
    """An anonymous in-memory file that SEAL's path-based ``save``/``load`` can use."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("secagg-seal", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
            self._tmp: str | None = None
        else:  # pragma: no cover - non-Linux fallback
            self.fd, self._tmp = tempfile.mkstemp(prefix="secagg-seal-")
            self.path = self._tmp
            atexit.register(os.unlink, self._tmp)

    def dump(self, obj: Any) -> bytes:
        os.ftruncate(self.fd, 0)
        obj.save(self.path)
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0)
        if not size or len(data) != size:
            raise CryptoError("could not serialize a SEAL object")
        return data

    def wipe(self) -> None:
        """Drop the file's pages (after it held a secret key)."""
        os.ftruncate(self.fd, 0)

    def load(self, obj: Any, context: Any, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        obj.load(context, self.path)


_local = threading.local()


def _memfile() -> _MemFile:
    mf: _MemFile | None = getattr(_local, "memfile", None)
    if mf is None or mf.pid != os.getpid():
        mf = _MemFile()
        _local.memfile = mf
    return mf


# --- minimal protobuf (TenSEAL's context format) ------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _pb_double(field: int, value: float) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<d", value)


def _pb_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Top-level fields of a protobuf message (varint, fixed64 and length-delimited only).

    Raises
    ------
    ConfigurationError
        If ``data`` is not a well-formed message.
    """
    fields: dict[int, list[bytes | int]] = {}
    pos, end = 0, len(data)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end or shift > 63:
                raise ConfigurationError("context bytes: truncated or overlong varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value = varint()
        elif wire == 1:
            if pos + 8 > end:
                raise ConfigurationError("context bytes: truncated fixed64")
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length = varint()
            if pos + length > end:
                raise ConfigurationError("context bytes: truncated field")
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ConfigurationError(f"context bytes: unsupported wire type {wire}")
        fields.setdefault(field, []).append(value)
    return fields


def _pb_message(fields: dict[int, list[bytes | int]], field: int) -> dict[int, list[bytes | int]]:
    values = fields.get(field, [])
    if not values:
        return {}
    last = values[-1]
    if not isinstance(last, bytes):
        raise ConfigurationError(f"context bytes: field {field} is not a message")
    return _pb_fields(last)
