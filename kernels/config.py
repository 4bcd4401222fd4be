"""Knobs of the kernel layer: backend choice, size thresholds, launch shapes.

The backend is read from the environment on every call, so a test or an operator can
switch it without re-importing anything::

    SECAGG_KERNELS=auto       # default: CUDA for device arrays, CPU Numba otherwise
    SECAGG_KERNELS=cpu        # Numba CPU kernels for everything
    SECAGG_KERNELS=cuda       # CUDA kernels for everything (host inputs are copied over)
    SECAGG_KERNELS=reference  # numpy + pycryptodome (secagg.kernels.reference)

Nothing here imports Numba: ``import secagg.kernels`` stays cheap and works without
numba-cuda or a GPU.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Literal

from secagg.errors import KernelError

__all__ = [
    "BACKENDS",
    "CPU_CHUNK_WORDS",
    "CUDA_BLOCKS_PER_SM",
    "CUDA_THREADS",
    "CUDA_TILE_WORDS",
    "DP_THREADS_VAR",
    "ENV_VAR",
    "MASK_THREADS_VAR",
    "SMALL_WORDS",
    "Backend",
    "backend",
    "cuda_available",
    "dp_threads",
    "mask_threads",
    "simulator",
]

Backend = Literal["auto", "cpu", "cuda", "reference"]

BACKENDS: tuple[Backend, ...] = ("auto", "cpu", "cuda", "reference")
"""Accepted values of :data:`ENV_VAR`."""

ENV_VAR = "SECAGG_KERNELS"
"""Environment variable that forces a backend."""

SMALL_WORDS = 64
"""In ``auto`` mode, host inputs of fewer packed words than this use the reference path.

Below this size the numpy/pycryptodome reference beats the Numba kernels' fixed cost (the
dispatch and the parallel-region start-up). Measured on a 2-core x86 box; see
``docs/kernels.md``.
"""

CPU_LANES = 16
"""ChaCha20 blocks computed side by side on the CPU: 16 x uint32 fills one AVX-512 vector."""

CPU_CHUNK_WORDS = 16 * (16 * CPU_LANES - 1)
"""Packed words per CPU work item (2,032).

A multiple of 8 (whole mask blocks), and one lane's rounding draws for it span at most
``16 * CPU_LANES`` ChaCha20 blocks (2032 / 16 + 1 = 128), so no vector group is wasted.
"""

CUDA_THREADS = 128
"""Threads per CUDA block."""

CUDA_TILE_WORDS = 16 * CUDA_THREADS - 16
"""Packed words per CUDA tile (2,032): each thread computes at most one rounding block per
lane (2032 / 16 + 1 = 128 blocks) and at most two mask blocks per key."""

CUDA_BLOCKS_PER_SM = 8
"""Persistent-grid size: at most this many CUDA blocks per multiprocessor (grid-stride)."""


def backend() -> Backend:
    """The backend forced by :data:`ENV_VAR` (``auto`` when unset or empty).

    Raises
    ------
    KernelError
        If the variable holds anything but one of :data:`BACKENDS`.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    for name in BACKENDS:
        if value == name:
            return name
    raise KernelError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}, got {value!r}")


DP_THREADS_VAR = "SECAGG_DP_THREADS"
"""Numba threads of the DP encode/decode passes (:mod:`secagg.kernels.dp_encode`): a
positive count, or ``0`` for all of Numba's threads. Default ``1``.

The passes are short (0.3-6 ms each at ``d' = 2^20``) and memory-bound, and a parallel region
with static scheduling waits at its barrier for its slowest thread: on the 2-core
development box shared with other jobs, two threads made the encode 3x slower in wall time
and 3x dearer in CPU (spinning workers) than one (``benchmarks/dp_encode_profile.py``,
docs/dp.md "Speed"). On an idle many-core server ``0`` shortens the decode's wall time."""


def dp_threads() -> int:
    """The thread count :data:`DP_THREADS_VAR` asks for (``0``: all); read on every call.

    Raises
    ------
    KernelError
        If the variable is not a non-negative integer.
    """
    return _threads(DP_THREADS_VAR)


MASK_THREADS_VAR = "SECAGG_MASK_THREADS"
"""Numba threads of the masking-layer CPU kernels (:mod:`secagg.kernels.cpu`: the fused
quantize + pack + mask, unpack, dequantize, the Numba keystream and unmask): a positive
count, or ``0`` for all of Numba's threads. Default ``1``.

Like the DP passes (:data:`DP_THREADS_VAR`) these are short memory-bound passes, and under
Numba's OpenMP layer a second thread costs its start-up and its spin after the region. On
the 2-core development box shared with other jobs, one sparse client's calls at ``10^6``
values took, on one thread against two, 13.9 against 27.9 CPU-ms (``mask_vector``), 2.3
against 5.4 (unpack) and 0.9 against 11.7 (dequantize), and less wall time too
(``benchmarks/mask_threads.py``, docs/kernels.md "Threads"). On an idle many-core server
``0`` shortens one large call's wall time."""


def mask_threads() -> int:
    """The thread count :data:`MASK_THREADS_VAR` asks for (``0``: all); read on every call.

    Raises
    ------
    KernelError
        If the variable is not a non-negative integer.
    """
    return _threads(MASK_THREADS_VAR)


def _threads(var: str) -> int:
    value = os.environ.get(var, "").strip() or "1"
    if not value.isdigit():
        raise KernelError(f"{var} must be a non-negative integer, got {value!r}")
    return int(value)


def simulator() -> bool:
    """Whether Numba's CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.cache
def cuda_available() -> bool:
    """Whether CUDA kernels can run: numba-cuda imports and finds a device (or the simulator).

    Imports ``numba.cuda`` on first use only; never raises.
    """
    try:
        cuda: Any = importlib.import_module("numba.cuda")
    except Exception:  # numba-cuda or the CUDA bindings missing
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False
