"""Numba CPU kernels: keystream, fused quantize + pack + mask, fused unmask, unpack.

Each public function here takes plain arrays (keys already turned into words by
:mod:`secagg.kernels.chacha`) and runs ``@njit(parallel=True)`` kernels that ``prange`` over
independent chunks of the output. Within a chunk, ChaCha20 blocks are made
:data:`~secagg.kernels.config.CPU_LANES` at a time by :func:`_blocks`, a loop over the
scalar :func:`~secagg.kernels.chacha.chacha20_block` that LLVM turns into vector code.

Keystream for the masks never exists beyond one chunk (2,032 words, 16 KiB): each mask's
blocks for a chunk are made and added before the next mask's.

Validation lives in :mod:`secagg.kernels.api`; these functions trust their arguments.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from numba import float64, njit, prange, uint32, uint64

from secagg.kernels.chacha import BLOCK_WORDS, chacha20_block_inline
from secagg.kernels.config import CPU_CHUNK_WORDS, CPU_LANES, mask_threads

__all__ = ["add_masks", "dequantize", "keystream_words", "mask_vector", "unpack"]

_LANES = CPU_LANES
_CHUNK = CPU_CHUNK_WORDS
_MASK_BLOCKS = -(-(_CHUNK // 8) // _LANES) * _LANES  # mask blocks per chunk, whole groups
_ROUND_BLOCKS = -(-(_CHUNK // BLOCK_WORDS + 1) // _LANES) * _LANES  # rounding blocks per lane
_KS_BLOCKS = 8 * _LANES  # blocks per work item of the plain keystream kernel
_TWO_M32 = 2.0**-32  # uint32 rounding draw -> [0, 1), as secagg.quantize

_LAUNCH = threading.Lock()
"""One parallel region at a time: Numba's ``workqueue`` threading layer (the fallback when
neither OpenMP nor TBB is there) aborts the process on concurrent launches, and on 2 cores
two concurrent regions gain nothing anyway."""


@contextmanager
def launch(threads: int | None = None) -> Iterator[None]:
    """Hold :data:`_LAUNCH` and run this thread's parallel regions on ``threads`` Numba
    threads (``0``: all; default :func:`~secagg.kernels.config.mask_threads`), restored
    after. The DP passes come through here with their own knob (``dp_encode.launch``)."""
    want = mask_threads() if threads is None else threads
    with _LAUNCH:
        before = numba.get_num_threads()
        most: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        numba.set_num_threads(min(want, most) if want else before)
        try:
            yield
        finally:
            numba.set_num_threads(before)


@njit(cache=True)
def _blocks(keys: Any, nonces: Any, row: Any, first: Any, count: Any, out: Any, tmp: Any) -> None:
    """Blocks ``first .. first + count - 1`` of stream ``row`` into ``out[: 16 * count]``.

    ``tmp`` is a ``16 * _LANES`` uint32 scratch array: the lane loop writes it transposed
    (word-major, constant stride) so that the loop vectorises, one block per vector lane.
    """
    for g in range(0, count, _LANES):
        for v in range(_LANES):
            s = chacha20_block_inline(keys, row, uint32(first + g + v), nonces)
            tmp[0 * _LANES + v] = s[0]
            tmp[1 * _LANES + v] = s[1]
            tmp[2 * _LANES + v] = s[2]
            tmp[3 * _LANES + v] = s[3]
            tmp[4 * _LANES + v] = s[4]
            tmp[5 * _LANES + v] = s[5]
            tmp[6 * _LANES + v] = s[6]
            tmp[7 * _LANES + v] = s[7]
            tmp[8 * _LANES + v] = s[8]
            tmp[9 * _LANES + v] = s[9]
            tmp[10 * _LANES + v] = s[10]
            tmp[11 * _LANES + v] = s[11]
            tmp[12 * _LANES + v] = s[12]
            tmp[13 * _LANES + v] = s[13]
            tmp[14 * _LANES + v] = s[14]
            tmp[15 * _LANES + v] = s[15]
        n = min(_LANES, count - g)
        for v in range(n):
            for w in range(16):
                out[(g + v) * 16 + w] = tmp[w * _LANES + v]


@njit(parallel=True, cache=True)
def _keystream_kernel(keys: Any, nonces: Any, first: Any, count: Any, out: Any) -> None:
    """``count`` blocks of stream 0 from block ``first`` into uint32 ``out``."""
    n_items = (count + _KS_BLOCKS - 1) // _KS_BLOCKS
    for it in prange(n_items):
        tmp = np.empty(16 * _LANES, np.uint32)
        b0 = it * _KS_BLOCKS
        n = min(_KS_BLOCKS, count - b0)
        _blocks(keys, nonces, 0, first + b0, n, out[b0 * 16 : (b0 + n) * 16], tmp)


@njit(cache=True)
def _apply_masks(
    words: Any, first_block: Any, keys: Any, nonces: Any, signs: Any, buf: Any, tmp: Any
) -> None:
    """``words += sum(sign * stream)`` mod 2^64, ``words[0]`` being stream word
    ``8 * first_block``; ``buf`` holds one mask's blocks for the chunk at a time."""
    nw = words.size
    nb = (nw + 7) // 8
    b64 = buf.view(np.uint64)  # little-endian pairs of uint32 = the uint64 stream words
    for m in range(keys.shape[0]):
        _blocks(keys, nonces, m, first_block, nb, buf, tmp)
        if signs[m] > 0:
            for e in range(nw):
                words[e] += b64[e]
        else:
            for e in range(nw):
                words[e] -= b64[e]


@njit(parallel=True, cache=True)
def _mask_kernel(
    x: Any, dim: Any, weighted: Any, weight: Any, lanes: Any, lane_bits: Any, clip: Any,
    scale: Any, max_level: Any, rkeys: Any, rnonces: Any, keys: Any, nonces: Any, signs: Any,
    out: Any, nan_flags: Any,
) -> None:  # fmt: skip
    """Fused quantize + weight + pack + mask of one update into ``out`` (``W`` words).

    Value ``j`` (``x[j]`` quantized for ``j < dim``, the weight for ``j == dim``) sits in
    word ``j mod W`` at lane ``j // W`` (``secagg.quantize``, step 5). Chunk ``c`` owns
    words ``[c * CHUNK, (c + 1) * CHUNK)``; for each lane it makes the rounding blocks that
    cover that lane's values, then adds every mask's blocks for the chunk.
    """
    n_words = out.size
    n_chunks = (n_words + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        i0 = c * _CHUNK
        nw = min(_CHUNK, n_words - i0)
        acc = np.zeros(nw, np.uint64)
        tmp = np.empty(16 * _LANES, np.uint32)
        rbuf = np.empty(_ROUND_BLOCKS * 16, np.uint32)
        nan = False
        for lane in range(lanes):
            j0 = i0 + lane * n_words
            j_end = min(j0 + nw, dim)
            shift = uint64(lane * lane_bits)
            if j0 < j_end:
                b0 = j0 // 16
                nb = (j_end - 1) // 16 - b0 + 1
                _blocks(rkeys, rnonces, 0, b0, nb, rbuf, tmp)
                base = b0 * 16
                for j in range(j0, j_end):
                    v = float64(x[j])
                    if v != v:
                        nan = True
                        continue
                    if v < -clip:
                        v = -clip
                    elif v > clip:
                        v = clip
                    # secagg.quantize step 2-3, same operation order, float64, no FMA
                    t = (v + clip) * scale
                    q = math.floor(t + float64(rbuf[j - base]) * _TWO_M32)
                    if q > max_level:
                        q = max_level
                    acc[j - j0] |= (uint64(q) * weight) << shift
            if weighted and j0 <= dim and dim < j0 + nw:
                acc[dim - j0] |= weight << shift
        mbuf = np.empty(_MASK_BLOCKS * 16, np.uint32)
        _apply_masks(acc, i0 // 8, keys, nonces, signs, mbuf, tmp)
        out[i0 : i0 + nw] = acc
        nan_flags[c] = nan


@njit(parallel=True, cache=True)
def _add_masks_kernel(acc: Any, keys: Any, nonces: Any, signs: Any) -> None:
    """In place ``acc += sum(sign * stream)`` mod 2^64 over all masks, chunk by chunk."""
    n_words = acc.size
    n_chunks = (n_words + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        i0 = c * _CHUNK
        nw = min(_CHUNK, n_words - i0)
        tmp = np.empty(16 * _LANES, np.uint32)
        mbuf = np.empty(_MASK_BLOCKS * 16, np.uint32)
        _apply_masks(acc[i0 : i0 + nw], i0 // 8, keys, nonces, signs, mbuf, tmp)


@njit(parallel=True, cache=True)
def _unpack_kernel(words: Any, lanes: Any, lane_bits: Any, lane_mask: Any, out: Any) -> None:
    """``out[lane * W + i] = (words[i] >> lane * L) & mask`` for the first ``out.size``."""
    n_words = words.size
    count = out.size
    n_chunks = (n_words + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        i0 = c * _CHUNK
        i1 = min(i0 + _CHUNK, n_words)
        for lane in range(lanes):
            shift = uint64(lane * lane_bits)
            base = lane * n_words
            for i in range(i0, min(i1, count - base)):
                out[base + i] = (words[i] >> shift) & lane_mask


@njit(parallel=True, cache=True)
def _dequantize_kernel(sums: Any, scale: Any, offset: Any, out: Any) -> None:
    """``out[i] = float64(sums[i]) / scale - offset``: :func:`secagg.quantize.dequantize`."""
    for i in prange(out.size):
        out[i] = np.float64(sums[i]) / scale - offset


# --- typed wrappers -------------------------------------------------------------------------


def keystream_words(
    key: npt.NDArray[np.uint32], nonce: npt.NDArray[np.uint32], first: int, count: int
) -> npt.NDArray[np.uint32]:
    """``count`` ChaCha20 blocks from block ``first`` as ``16 * count`` uint32 words."""
    out = np.empty(16 * count, dtype=np.uint32)
    if count:
        with launch():
            _keystream_kernel(key.reshape(1, 8), nonce.reshape(1, 3), first, count, out)
    return out


def mask_vector(
    x: npt.NDArray[np.floating],
    dim: int,
    weight: int,
    weighted: bool,
    lanes: int,
    lane_bits: int,
    clip: float,
    scale: float,
    max_level: int,
    rkey: npt.NDArray[np.uint32],
    rnonce: npt.NDArray[np.uint32],
    keys: npt.NDArray[np.uint32],
    nonces: npt.NDArray[np.uint32],
    signs: npt.NDArray[np.int64],
    n_words: int,
) -> tuple[npt.NDArray[np.uint64], bool]:
    """Masked packed words of one update, and whether ``x`` held a NaN."""
    out = np.empty(n_words, dtype=np.uint64)
    if n_words == 0:
        return out, False
    nan_flags = np.zeros(-(-n_words // _CHUNK), dtype=np.bool_)
    with launch():
        _mask_kernel(
            x, np.int64(dim), weighted, np.uint64(weight), np.int64(lanes), np.int64(lane_bits),
            np.float64(clip), np.float64(scale), np.int64(max_level),
            rkey.reshape(1, 8), rnonce.reshape(1, 3), keys, nonces, signs, out, nan_flags,
        )  # fmt: skip
    return out, bool(nan_flags.any())


def add_masks(
    acc: npt.NDArray[np.uint64],
    keys: npt.NDArray[np.uint32],
    nonces: npt.NDArray[np.uint32],
    signs: npt.NDArray[np.int64],
) -> None:
    """In place: ``acc += sum(sign * stream)`` mod 2^64."""
    if acc.size and keys.shape[0]:
        with launch():
            _add_masks_kernel(acc, keys, nonces, signs)


def unpack(
    words: npt.NDArray[np.uint64], lanes: int, lane_bits: int, count: int
) -> npt.NDArray[np.uint64]:
    """First ``count`` lane values of lane-major packed ``words``."""
    out = np.empty(count, dtype=np.uint64)
    if count:
        mask = (1 << lane_bits) - 1 if lane_bits < 64 else (1 << 64) - 1
        with launch():
            _unpack_kernel(words, np.int64(lanes), np.int64(lane_bits), np.uint64(mask), out)
    return out


def dequantize(
    sums: npt.NDArray[np.uint64], dim: int, scale: float, offset: float
) -> npt.NDArray[np.float64]:
    """``sums[:dim] / scale - offset`` in float64, element by element as numpy does it."""
    out = np.empty(dim, dtype=np.float64)
    if dim:
        with launch():
            _dequantize_kernel(sums, np.float64(scale), np.float64(offset), out)
    return out
