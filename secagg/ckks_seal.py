"""SEAL and TenSEAL serialization: SEAL objects to and from bytes, TenSEAL's context protobuf.

The SEAL bindings that ship with TenSEAL 0.3.18 (``tenseal.sealapi``) serialize through file
paths only, so objects pass through an anonymous in-memory file (``memfd``, one per thread and
process). TenSEAL's context format is the protobuf ``TenSEALContextProto``
(``tenseal/proto/tensealcontext.proto``, shipped in TenSEAL's wheel); its reader is generated
from that file into :mod:`secagg._gen` (``python -m secagg.ckks_codegen``).
"""

from __future__ import annotations

import atexit
import os
import struct
import tempfile
import threading
from typing import Any, Final

import tenseal as ts

from secagg.errors import CryptoError

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
