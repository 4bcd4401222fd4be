"""The demo's control channel to its site processes, without pickle.

Messages are JSON documents whose byte strings and numpy arrays are replaced by references
to raw buffers appended after the document::

    u32 json length | json | buffer 0 | buffer 1 | ...

Dicts are encoded as key/value pairs so integer keys survive. Only the types below decode;
anything else is refused on both sides.
"""

from __future__ import annotations

import json
import struct
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from secagg.errors import MalformedMessage

__all__ = ["dumps", "loads", "recv", "send"]

_DTYPES = frozenset({"<f4", "<f8", "<i8", "<i4", "<u8", "|u1", "|b1"})
MAX_MESSAGE = 1 << 30


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` (None, bool, int, float, str, bytes, ndarray, list, tuple, dict)."""
    buffers: list[bytes] = []

    def enc(o: Any) -> Any:
        if o is None or isinstance(o, bool | int | float | str):
            return o
        if isinstance(o, bytes | bytearray):
            buffers.append(bytes(o))
            return {"b": len(buffers) - 1}
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
            if dtype.str not in _DTYPES:
                raise TypeError(f"dtype {a.dtype} is not sent")
            buffers.append(a.astype(dtype, copy=False).tobytes())
            return {"a": len(buffers) - 1, "dtype": dtype.str, "shape": list(a.shape)}
        if isinstance(o, np.generic):
            return enc(o.item())
        if isinstance(o, list | tuple):
            return {"l": [enc(v) for v in o]}
        if isinstance(o, dict):
            return {"d": [[enc(k), enc(v)] for k, v in o.items()]}
        raise TypeError(f"{type(o).__name__} is not sent over the demo's control channel")

    doc = json.dumps(enc(obj)).encode()
    parts = [struct.pack("<I", len(doc)), doc]
    for b in buffers:
        parts += [struct.pack("<Q", len(b)), b]
    return b"".join(parts)


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`; malformed input raises :class:`MalformedMessage`."""
    view = memoryview(data)
    try:
        (n,) = struct.unpack_from("<I", view, 0)
        doc = json.loads(bytes(view[4 : 4 + n]))
        pos = 4 + n
        buffers = []
        while pos < len(view):
            (size,) = struct.unpack_from("<Q", view, pos)
            if pos + 8 + size > len(view):
                raise MalformedMessage("truncated buffer")
            buffers.append(bytes(view[pos + 8 : pos + 8 + size]))
            pos += 8 + size
    except (struct.error, ValueError) as exc:
        raise MalformedMessage(f"bad control message: {exc}") from None

    def dec(o: Any) -> Any:
        if not isinstance(o, dict):
            return o
        if "b" in o:
            return buffers[o["b"]]
        if "a" in o:
            if o["dtype"] not in _DTYPES:
                raise MalformedMessage("unexpected dtype")
            arr = np.frombuffer(buffers[o["a"]], dtype=np.dtype(o["dtype"]))
            return arr.reshape(o["shape"]).copy()
        if "l" in o:
            return [dec(v) for v in o["l"]]
        if "d" in o:
            return {_key(dec(k)): dec(v) for k, v in o["d"]}
        raise MalformedMessage("unknown control message node")

    try:
        return dec(doc)
    except (IndexError, KeyError, ValueError) as exc:
        raise MalformedMessage(f"bad control message: {exc}") from None


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def send(conn: Connection, obj: Any) -> None:
    """Send one message over a pipe (``send_bytes``: never pickled)."""
    conn.send_bytes(dumps(obj))


def recv(conn: Connection) -> Any:
    """Receive one message from a pipe."""
    return loads(conn.recv_bytes(MAX_MESSAGE))
