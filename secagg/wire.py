"""A strict little binary codec: fixed-width big-endian integers and length-checked bytes.

Every read checks the remaining length first, so truncated or oversized input raises
:class:`~secagg.errors.MalformedMessage` before anything large is allocated.
"""

from __future__ import annotations

import math
import struct

from secagg.errors import MalformedMessage

__all__ = ["Reader", "Writer"]


class Writer:
    """Accumulates an encoding."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack(">B", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack(">Q", v))
        return self

    def f64(self, v: float) -> Writer:
        self._parts.append(struct.pack(">d", v))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"expected {size} bytes, got {len(data)}")
        self._parts.append(bytes(data))
        return self

    def var(self, data: bytes) -> Writer:
        self.u32(len(data))
        self._parts.append(bytes(data))
        return self

    def ids(self, values: list[int] | tuple[int, ...]) -> Writer:
        self.u32(len(values))
        self._parts.append(struct.pack(f">{len(values)}I", *values))
        return self

    def raw(self, data: bytes | memoryview) -> Writer:
        self._parts.append(bytes(data))
        return self

    def borrow(self, data: memoryview) -> Writer:
        """Append ``data`` without copying it (a packed vector's bytes: one copy fewer of
        8 d / P bytes per upload). The buffer must not change before :meth:`getvalue`,
        which :meth:`secagg.messages.Message.encode` calls right after the body."""
        self._parts.append(data)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Consumes an encoding; every method raises ``MalformedMessage`` on short input."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise MalformedMessage(f"truncated message: need {n} bytes, {self.remaining} left")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def f64(self) -> float:
        v = float(struct.unpack(">d", self._take(8))[0])
        if not math.isfinite(v):
            raise MalformedMessage("non-finite float")
        return v

    def fixed(self, size: int) -> bytes:
        return bytes(self._take(size))

    def var(self, max_len: int) -> bytes:
        n = self.u32()
        if n > max_len:
            raise MalformedMessage(f"field of {n} bytes exceeds its bound of {max_len}")
        return bytes(self._take(n))

    def ids(self, max_count: int) -> tuple[int, ...]:
        n = self.u32()
        if n > max_count:
            raise MalformedMessage(f"list of {n} ids exceeds its bound of {max_count}")
        return tuple(struct.unpack(f">{n}I", self._take(4 * n)))

    def view(self, n: int) -> memoryview:
        return self._take(n)

    def end(self) -> None:
        if self.remaining:
            raise MalformedMessage(f"{self.remaining} trailing bytes")
