"""Reused scratch vectors for the DP encode and decode (docs/dp.md, "Speed").

A fresh 8 MiB numpy array costs its page faults on first touch: 2-5 ms at ``d' = 2^20`` on
the development VM, as much as the FWHT itself, and the encode used to make four of them.
The temporaries that never leave :mod:`secagg.dp` (the rotation buffer, the rounding coins,
the decode buffer) are borrowed from this pool instead and **zeroed when they are handed
back** (they held a rotated update or its rounding coins), so no value outlives the call.
Thread-safe: each borrow pops its own array (``list.pop`` / ``append`` are atomic in
CPython); at most :data:`KEEP` arrays of one dtype and length are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["KEEP", "borrow"]

KEEP = 2
"""Arrays kept per (dtype, length): one encode's two vectors, or two concurrent decodes."""

_FREE: dict[tuple[str, int], list[npt.NDArray[Any]]] = {}


@contextmanager
def borrow(dtype: type[np.generic], n: int) -> Iterator[npt.NDArray[Any]]:
    """A contiguous length-``n`` array of ``dtype`` (contents undefined) for the ``with``
    block; zeroed and kept for reuse afterwards."""
    free = _FREE.setdefault((np.dtype(dtype).str, n), [])
    try:
        buf = free.pop()
    except IndexError:
        buf = np.empty(n, dtype=dtype)
    try:
        yield buf
    finally:
        buf.fill(0)
        if len(free) < KEEP:
            free.append(buf)
