"""Kernel benchmarks on the CPU: ChaCha20 keystream and the fused mask / unmask.

pytest-benchmark suite (``make bench`` runs it with the others)::

    pytest benchmarks/bench_kernels.py --benchmark-only

The table quoted in ``docs/kernels.md`` (best of ``--repeat`` runs, same process, so the
Numba and pycryptodome numbers share the machine's state)::

    python benchmarks/bench_kernels.py [--dim 1000000] [--mib 64] [--repeat 5]

Numba kernels are compiled (or loaded from the on-disk cache) before anything is timed.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from Crypto.Cipher import ChaCha20
from suite.common import sized

from secagg import kernels
from secagg.kernels import chacha, config, cpu
from secagg.kernels import reference as ref
from secagg.prg import Purpose, StreamMask
from secagg.quantize import QuantSpec

DIM = sized(1_000_000, 20_000)
SPEC = QuantSpec(clip=3.0, bits=16, n_clients=1000)  # 26-bit lanes, 2 per word
KS_BYTES = sized(16 << 20, 1 << 16)  # keystream per pytest-benchmark round
MASK_COUNTS = (0, 1, 8, 16)


def _masks(k: int) -> list[StreamMask]:
    return [StreamMask(os.urandom(32), Purpose.PAIR_MASK, 1 if i % 2 else -1) for i in range(k)]


def _numba_keystream_into(out: np.ndarray, key: bytes, nonce: bytes) -> None:
    """Numba CPU keystream of ``out.size`` uint32 words through the public kernel wrapper
    ``kernels.cpu.keystream_words`` (its ``np.empty`` is lazy: the kernel writes every page,
    as it would into ``out``); ``out`` only gives the size."""
    cpu.keystream_words(chacha.key_words(key), chacha.nonce_words(nonce), 0, out.size // 16)


@functools.cache
def _zeros(nbytes: int) -> bytes:
    return bytes(nbytes)


def _pycryptodome_keystream_into(out: np.ndarray, key: bytes, nonce: bytes) -> None:
    """pycryptodome (single thread) keystream into a preallocated buffer: encrypt zeros."""
    cipher = ChaCha20.new(key=key, nonce=nonce)
    cipher.encrypt(_zeros(out.nbytes), output=memoryview(out.view(np.uint8)))


def _with_backend(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        old = os.environ.get(config.ENV_VAR)
        os.environ[config.ENV_VAR] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[config.ENV_VAR]
            else:
                os.environ[config.ENV_VAR] = old

    return run


# --- pytest-benchmark ---------------------------------------------------------------------


def _rate(benchmark: Any, name: str, amount: float) -> None:
    """Record ``amount / median seconds`` (absent under ``--benchmark-disable``)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info[name] = amount / stats.stats.median


@pytest.mark.benchmark(group="keystream")
@pytest.mark.parametrize("impl", ["numba-cpu", "pycryptodome"])
def test_keystream(benchmark: Any, impl: str) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    out = np.empty(KS_BYTES // 4, dtype=np.uint32)
    fn = _numba_keystream_into if impl == "numba-cpu" else _pycryptodome_keystream_into
    fn(out, key, nonce)  # compile / warm
    benchmark(fn, out, key, nonce)
    _rate(benchmark, "GB/s", KS_BYTES / 1e9)


@pytest.mark.benchmark(group="keystream-api")
def test_keystream_api_bytes(benchmark: Any) -> None:
    """The public helper: allocation and the copy to ``bytes`` included."""
    key, nonce = os.urandom(32), os.urandom(12)
    run = _with_backend("cpu", lambda: kernels.keystream(key, nonce, KS_BYTES))
    run()
    benchmark(run)
    _rate(benchmark, "GB/s", KS_BYTES / 1e9)


@pytest.mark.benchmark(group="fused-mask-1e6")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("k", MASK_COUNTS)
def test_fused_mask(benchmark: Any, backend: str, k: int) -> None:
    x = np.random.default_rng(0).normal(size=DIM).astype(np.float32)
    rkey, masks = os.urandom(32), _masks(k)
    run = _with_backend(backend, lambda: kernels.mask_vector(x, 1, SPEC, rkey, masks))
    run()
    if backend == "reference":
        benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        benchmark(run)
    _rate(benchmark, "Mparams/s", DIM / 1e6)


@pytest.mark.benchmark(group="unmask-1e6")
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_server_unmask_16(benchmark: Any, backend: str) -> None:
    acc = np.zeros(SPEC.words(DIM), dtype=np.uint64)
    masks = _masks(16)
    run = _with_backend(backend, lambda: kernels.add_masks(acc, masks))
    run()
    benchmark.pedantic(run, rounds=3 if backend == "reference" else 10, iterations=1)


# --- table --------------------------------------------------------------------------------


def _best(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--mib", type=int, default=64, help="keystream size in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    print(f"numba threads: {os.environ.get('NUMBA_NUM_THREADS', os.cpu_count())}")

    key, nonce = os.urandom(32), os.urandom(12)
    n = a.mib << 20
    out = np.empty(n // 4, dtype=np.uint32)
    t_nb = _best(lambda: _numba_keystream_into(out, key, nonce), a.repeat)
    t_pc = _best(lambda: _pycryptodome_keystream_into(out, key, nonce), a.repeat)
    api = _with_backend("cpu", lambda: kernels.keystream(key, nonce, n))
    t_api = _best(api, a.repeat)
    print(f"\nkeystream, {a.mib} MiB              GB/s")
    print(f"  numba CPU kernel                {n / t_nb / 1e9:6.2f}  ({t_pc / t_nb:.1f}x)")
    print(f"  numba via keystream() -> bytes  {n / t_api / 1e9:6.2f}  ({t_pc / t_api:.1f}x)")
    print(f"  pycryptodome, 1 thread          {n / t_pc / 1e9:6.2f}")

    x = np.random.default_rng(0).normal(size=a.dim).astype(np.float32)
    rkey = os.urandom(32)
    print(f"\nfused quantize+pack+mask, {a.dim:,} params, {SPEC.lane_bits}-bit lanes")
    print("  masks   cpu ms   Mparams/s   reference ms   Mparams/s   speed-up")
    for k in MASK_COUNTS:
        masks = _masks(k)

        def fused(m: list[StreamMask] = masks) -> Any:
            return kernels.mask_vector(x, 1, SPEC, rkey, m)

        def fused_ref(m: list[StreamMask] = masks) -> Any:
            return ref.mask_vector(x, 1, SPEC, rkey, m)

        t_c = _best(_with_backend("cpu", fused), a.repeat)
        t_r = _best(fused_ref, max(1, a.repeat // 2))
        print(
            f"  {k:5d} {t_c * 1e3:8.2f} {a.dim / t_c / 1e6:11.1f} {t_r * 1e3:14.2f}"
            f" {a.dim / t_r / 1e6:11.1f} {t_r / t_c:9.1f}x"
        )

    acc = np.zeros(SPEC.words(a.dim), dtype=np.uint64)
    masks = _masks(16)
    t_c = _best(_with_backend("cpu", lambda: kernels.add_masks(acc, masks)), a.repeat)
    t_r = _best(lambda: ref.add_masks(acc, masks), max(1, a.repeat // 2))
    print(
        f"\nserver unmask, 16 seeds x {acc.size:,} words: cpu {t_c * 1e3:.2f} ms, "
        f"reference {t_r * 1e3:.2f} ms ({t_r / t_c:.1f}x)"
    )


if __name__ == "__main__":
    main()
