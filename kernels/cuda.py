"""CUDA kernels (numba-cuda): keystream, fused quantize + pack + mask, fused unmask, unpack.

Layout of the work: a CUDA block of :data:`~secagg.kernels.config.CUDA_THREADS` threads owns a
tile of :data:`~secagg.kernels.config.CUDA_TILE_WORDS` packed words at a time and walks the
tiles grid-stride (a persistent grid). Each thread computes whole ChaCha20 blocks in
registers (:func:`~secagg.kernels.chacha.chacha20_block`); the 8 uint64 words of a mask block
are added to the tile in shared memory, and the tile goes to global memory in coalesced
stores (consecutive threads, consecutive words). Every mask is generated block by block and
summed straight into the tile: no stream is ever materialised.

Fused mask, per tile and per lane ``l``: the tile's values of lane ``l`` are
``j0 .. j0 + nw - 1`` with ``j0 = i0 + l * W``; their rounding draws span at most
``CUDA_THREADS`` blocks of the rounding stream, one per thread, staged in shared memory; then
each thread quantizes consecutive values (coalesced reads of ``x``) and ORs them into its
lane of the tile. After the lanes, each thread adds every mask's block for its 8-word groups.

Floating point: NVVM contracts ``a * b + c`` into an FMA, which would round differently from
the numpy reference. The quantization therefore uses libdevice's ``dmul_rn``/``dadd_rn``,
which are never contracted (under the simulator they are plain Python float operations).

Only import this module when CUDA is wanted: it imports ``numba.cuda``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import cuda as _numba_cuda
from numba import float64, uint32, uint64

from secagg.kernels.chacha import chacha20_block
from secagg.kernels.config import (
    CUDA_BLOCKS_PER_SM,
    CUDA_THREADS,
    CUDA_TILE_WORDS,
    simulator,
)

__all__ = [
    "add_masks",
    "dequantize",
    "has_nan",
    "keystream_words",
    "mask_vector",
    "max_grid",
    "unpack",
]

cuda: Any = _numba_cuda  # numba-cuda's kernel-side API is dynamic; mypy sees it as Any

_TPB = CUDA_THREADS
_TILE = CUDA_TILE_WORDS
_ADD_TILE = 16 * CUDA_THREADS  # add_masks has no rounding lanes: two whole blocks a thread
_SH_WORDS = _ADD_TILE + _ADD_TILE // 8  # uint64 tile, one pad word per 8 (bank spread)
_SH_ROUND = 17 * CUDA_THREADS  # uint32 rounding blocks, padded to 17 words each
_TWO_M32 = 2.0**-32  # uint32 rounding draw -> [0, 1), as secagg.quantize

if simulator():

    def _mul_rn(a: float, b: float) -> float:
        return a * b

    def _add_rn(a: float, b: float) -> float:
        return a + b

    _KERNEL: dict[str, Any] = {}

else:  # pragma: no cover - needs a GPU or the CUDA toolkit
    from numba.cuda.libdevice import dadd_rn as _add_rn
    from numba.cuda.libdevice import dmul_rn as _mul_rn

    # Without a bound, ptxas gives the fused kernel 119 registers (4 blocks of 128 threads
    # per SM); bounded to 8 blocks it fits 64 registers with no spills (ptxas -v, sm_90).
    _KERNEL = {"launch_bounds": (CUDA_THREADS, CUDA_BLOCKS_PER_SM), "cache": True}


def _kernel(fn: Callable[..., None]) -> Any:
    """``@cuda.jit`` with this module's launch bounds (and disk cache) on real devices."""
    return cuda.jit(**_KERNEL)(fn)


def _device(fn: Callable[..., Any]) -> Any:
    """``@cuda.jit(device=True)``."""
    return cuda.jit(device=True)(fn)


@_device
def _pad(e: Any) -> Any:
    """Shared-memory slot of tile word ``e``: one pad word after every 8.

    A thread owning 8 consecutive words then starts 9 words after its neighbour instead of
    8, which spreads a warp's 64-bit accesses over the banks.
    """
    return e + (e >> 3)


@_device
def _add_block(sh: Any, base: Any, keys: Any, nonces: Any, signs: Any, first_block: Any) -> None:
    """Add every mask's block ``first_block`` to tile words ``base .. base + 7`` in ``sh``."""
    a0 = sh[_pad(base)]
    a1 = sh[_pad(base + 1)]
    a2 = sh[_pad(base + 2)]
    a3 = sh[_pad(base + 3)]
    a4 = sh[_pad(base + 4)]
    a5 = sh[_pad(base + 5)]
    a6 = sh[_pad(base + 6)]
    a7 = sh[_pad(base + 7)]
    ctr = uint32(first_block)
    for m in range(keys.shape[0]):
        s = chacha20_block(keys, m, ctr, nonces)
        w0 = uint64(s[0]) | (uint64(s[1]) << uint64(32))
        w1 = uint64(s[2]) | (uint64(s[3]) << uint64(32))
        w2 = uint64(s[4]) | (uint64(s[5]) << uint64(32))
        w3 = uint64(s[6]) | (uint64(s[7]) << uint64(32))
        w4 = uint64(s[8]) | (uint64(s[9]) << uint64(32))
        w5 = uint64(s[10]) | (uint64(s[11]) << uint64(32))
        w6 = uint64(s[12]) | (uint64(s[13]) << uint64(32))
        w7 = uint64(s[14]) | (uint64(s[15]) << uint64(32))
        if signs[m] > 0:
            a0 = uint64(a0 + w0)
            a1 = uint64(a1 + w1)
            a2 = uint64(a2 + w2)
            a3 = uint64(a3 + w3)
            a4 = uint64(a4 + w4)
            a5 = uint64(a5 + w5)
            a6 = uint64(a6 + w6)
            a7 = uint64(a7 + w7)
        else:
            a0 = uint64(a0 - w0)
            a1 = uint64(a1 - w1)
            a2 = uint64(a2 - w2)
            a3 = uint64(a3 - w3)
            a4 = uint64(a4 - w4)
            a5 = uint64(a5 - w5)
            a6 = uint64(a6 - w6)
            a7 = uint64(a7 - w7)
    sh[_pad(base)] = a0
    sh[_pad(base + 1)] = a1
    sh[_pad(base + 2)] = a2
    sh[_pad(base + 3)] = a3
    sh[_pad(base + 4)] = a4
    sh[_pad(base + 5)] = a5
    sh[_pad(base + 6)] = a6
    sh[_pad(base + 7)] = a7


@_kernel
def _keystream_kernel(keys: Any, nonces: Any, first: Any, count: Any, out: Any) -> None:
    """``count`` blocks of stream 0 from block ``first`` into uint32 ``out``.

    One block per thread, staged in shared memory (17-word rows: conflict-free) and written
    out by consecutive threads to consecutive words.
    """
    sh = cuda.shared.array(_SH_ROUND, uint32)
    t = cuda.threadIdx.x
    n_tiles = (count + _TPB - 1) // _TPB
    for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
        b = tile * _TPB + t
        if b < count:
            s = chacha20_block(keys, 0, uint32(first + b), nonces)
            r = t * 17
            sh[r] = s[0]
            sh[r + 1] = s[1]
            sh[r + 2] = s[2]
            sh[r + 3] = s[3]
            sh[r + 4] = s[4]
            sh[r + 5] = s[5]
            sh[r + 6] = s[6]
            sh[r + 7] = s[7]
            sh[r + 8] = s[8]
            sh[r + 9] = s[9]
            sh[r + 10] = s[10]
            sh[r + 11] = s[11]
            sh[r + 12] = s[12]
            sh[r + 13] = s[13]
            sh[r + 14] = s[14]
            sh[r + 15] = s[15]
        cuda.syncthreads()
        base = tile * _TPB * 16
        n_out = min(_TPB, count - tile * _TPB) * 16
        for e in range(t, n_out, _TPB):
            out[base + e] = sh[(e >> 4) * 17 + (e & 15)]
        cuda.syncthreads()


@_kernel
def _mask_kernel(
    x: Any, dim: Any, weighted: Any, weight: Any, lanes: Any, lane_bits: Any, clip: Any,
    scale: Any, max_level: Any, rkeys: Any, rnonces: Any, keys: Any, nonces: Any, signs: Any,
    out: Any, nan_flag: Any,
) -> None:  # fmt: skip
    """Fused quantize + weight + pack + mask of one update into ``out`` (``W`` words)."""
    acc = cuda.shared.array(_SH_WORDS, uint64)
    rnd = cuda.shared.array(_SH_ROUND, uint32)
    t = cuda.threadIdx.x
    n_words = out.shape[0]
    n_tiles = (n_words + _TILE - 1) // _TILE
    for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
        i0 = tile * _TILE
        nw = min(_TILE, n_words - i0)
        for e in range(t, _TILE, _TPB):
            acc[_pad(e)] = uint64(0)
        for lane in range(lanes):
            j0 = i0 + lane * n_words
            j_end = min(j0 + nw, dim)
            b0 = j0 // 16
            cuda.syncthreads()  # rnd free again; acc zeroed
            if j0 < j_end and t <= (j_end - 1) // 16 - b0:
                s = chacha20_block(rkeys, 0, uint32(b0 + t), rnonces)
                r = t * 17
                rnd[r] = s[0]
                rnd[r + 1] = s[1]
                rnd[r + 2] = s[2]
                rnd[r + 3] = s[3]
                rnd[r + 4] = s[4]
                rnd[r + 5] = s[5]
                rnd[r + 6] = s[6]
                rnd[r + 7] = s[7]
                rnd[r + 8] = s[8]
                rnd[r + 9] = s[9]
                rnd[r + 10] = s[10]
                rnd[r + 11] = s[11]
                rnd[r + 12] = s[12]
                rnd[r + 13] = s[13]
                rnd[r + 14] = s[14]
                rnd[r + 15] = s[15]
            cuda.syncthreads()
            shift = uint64(lane * lane_bits)
            off = j0 - b0 * 16
            for e in range(t, j_end - j0, _TPB):
                v = float64(x[j0 + e])
                if v != v:
                    nan_flag[0] = 1
                    continue
                if v < -clip:
                    v = -clip
                elif v > clip:
                    v = clip
                idx = off + e
                r32 = rnd[(idx >> 4) * 17 + (idx & 15)]
                # secagg.quantize steps 2-3 in the reference's operation order, never fused
                tq = _mul_rn(_add_rn(v, clip), scale)
                q = math.floor(_add_rn(tq, float64(r32) * _TWO_M32))
                if q > max_level:
                    q = max_level
                acc[_pad(e)] |= (uint64(q) * weight) << shift
            if weighted and t == 0 and j0 <= dim and dim < j0 + nw:
                acc[_pad(dim - j0)] |= weight << shift
        cuda.syncthreads()
        nb = (nw + 7) // 8
        for bl in range(t, nb, _TPB):
            _add_block(acc, bl * 8, keys, nonces, signs, i0 // 8 + bl)
        cuda.syncthreads()
        for e in range(t, nw, _TPB):
            out[i0 + e] = acc[_pad(e)]
        cuda.syncthreads()


@_kernel
def _add_masks_kernel(acc: Any, keys: Any, nonces: Any, signs: Any) -> None:
    """In place ``acc += sum(sign * stream)`` mod 2^64, tile by tile through shared memory."""
    sh = cuda.shared.array(_SH_WORDS, uint64)
    t = cuda.threadIdx.x
    n_words = acc.shape[0]
    n_tiles = (n_words + _ADD_TILE - 1) // _ADD_TILE
    for tile in range(cuda.blockIdx.x, n_tiles, cuda.gridDim.x):
        i0 = tile * _ADD_TILE
        nw = min(_ADD_TILE, n_words - i0)
        for e in range(t, _ADD_TILE, _TPB):
            sh[_pad(e)] = acc[i0 + e] if e < nw else uint64(0)
        cuda.syncthreads()
        nb = (nw + 7) // 8
        for bl in range(t, nb, _TPB):
            _add_block(sh, bl * 8, keys, nonces, signs, i0 // 8 + bl)
        cuda.syncthreads()
        for e in range(t, nw, _TPB):
            acc[i0 + e] = sh[_pad(e)]
        cuda.syncthreads()


@_kernel
def _unpack_kernel(words: Any, lane_bits: Any, lane_mask: Any, out: Any) -> None:
    """``out[k] = (words[k mod W] >> (k // W) * L) & mask``: value ``k`` of the packing."""
    n_words = words.shape[0]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for k in range(start, out.shape[0], stride):
        lane = k // n_words
        out[k] = (words[k - lane * n_words] >> uint64(lane * lane_bits)) & lane_mask


@_kernel
def _nan_kernel(x: Any, flag: Any) -> None:
    """``flag[0] = 1`` if any value of ``x`` is NaN."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, x.shape[0], stride):
        if x[i] != x[i]:
            flag[0] = 1


@_kernel
def _dequantize_kernel(sums: Any, scale: Any, neg_offset: Any, out: Any) -> None:
    """``out[i] = float64(sums[i]) / scale - offset`` (IEEE division, no contraction)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, out.shape[0], stride):
        out[i] = _add_rn(float64(sums[i]) / scale, neg_offset)


# --- typed wrappers -------------------------------------------------------------------------


@functools.cache
def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's fake device may lack the attribute
        return 1


def max_grid() -> int:
    """Upper bound on CUDA blocks per launch (persistent grid)."""
    return _sm_count() * CUDA_BLOCKS_PER_SM


def _grid(n_tiles: int) -> int:
    return max(1, min(n_tiles, max_grid()))


def keystream_words(
    key: npt.NDArray[np.uint32], nonce: npt.NDArray[np.uint32], first: int, count: int
) -> Any:
    """``count`` blocks from block ``first`` as a device array of ``16 * count`` uint32."""
    out = cuda.device_array(16 * count, dtype=np.uint32)
    if count:
        k = cuda.to_device(key.reshape(1, 8))
        n = cuda.to_device(nonce.reshape(1, 3))
        grid = _grid(-(-count // _TPB))
        _keystream_kernel[grid, _TPB](k, n, np.int64(first), np.int64(count), out)
    return out


def mask_vector(
    x: Any,
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
) -> tuple[Any, bool]:
    """Masked packed words of one update as a device array, and whether ``x`` held a NaN.

    ``x`` is a device array (float32 or float64) of ``dim`` values.
    """
    out = cuda.device_array(n_words, dtype=np.uint64)
    if n_words == 0:
        return out, False
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    grid = _grid(-(-n_words // _TILE))
    _mask_kernel[grid, _TPB](
        x, np.int64(dim), np.bool_(weighted), np.uint64(weight), np.int64(lanes),
        np.int64(lane_bits), np.float64(clip), np.float64(scale), np.int64(max_level),
        cuda.to_device(rkey.reshape(1, 8)), cuda.to_device(rnonce.reshape(1, 3)),
        cuda.to_device(keys), cuda.to_device(nonces), cuda.to_device(signs), out, flag,
    )  # fmt: skip
    return out, bool(flag.copy_to_host()[0])


def add_masks(
    acc: Any,
    keys: npt.NDArray[np.uint32],
    nonces: npt.NDArray[np.uint32],
    signs: npt.NDArray[np.int64],
) -> None:
    """In place on the device array ``acc``: ``acc += sum(sign * stream)`` mod 2^64."""
    n = acc.shape[0]
    if n and keys.shape[0]:
        grid = _grid(-(-n // _ADD_TILE))
        _add_masks_kernel[grid, _TPB](
            acc, cuda.to_device(keys), cuda.to_device(nonces), cuda.to_device(signs)
        )


def unpack(words: Any, lane_bits: int, count: int) -> Any:
    """First ``count`` lane values of the device array ``words`` as a device array."""
    out = cuda.device_array(count, dtype=np.uint64)
    if count:
        mask = (1 << lane_bits) - 1 if lane_bits < 64 else (1 << 64) - 1
        grid = _grid(-(-count // _TPB))
        _unpack_kernel[grid, _TPB](words, np.int64(lane_bits), np.uint64(mask), out)
    return out


def dequantize(sums: Any, dim: int, scale: float, offset: float) -> Any:
    """``sums[:dim] / scale - offset`` of the device array ``sums`` as a float64 device array."""
    out = cuda.device_array(dim, dtype=np.float64)
    if dim:
        grid = _grid(-(-dim // _TPB))
        _dequantize_kernel[grid, _TPB](sums, np.float64(scale), np.float64(-offset), out)
    return out


def has_nan(x: Any) -> bool:
    """Whether the 1-D float device array ``x`` holds a NaN (one flag word comes back)."""
    n = x.shape[0]
    if n == 0:
        return False
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    _nan_kernel[_grid(-(-n // _TPB)), _TPB](x, flag)
    return bool(flag.copy_to_host()[0])
