"""CKKS building blocks: pytest-benchmark suite and the measurement table of ``docs/ckks.md``.

The table (10^6 parameters, 8-bit values, 100 clients; the server sums one client's upload
100 times, re-parsing every ciphertext each time)::

    python benchmarks/bench_ckks.py [--dim 1000000] [--bits 8] [--clients 100]

The pytest-benchmark suite (smaller: one client's encryption, a 10-client sum)::

    pytest benchmarks/bench_ckks.py --benchmark-only
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tenseal as ts
from suite.common import sized

from secagg import ckks
from secagg.he_params import HEParams, Mode, select_params

DIM = sized(1_000_000, 5_000)
BITS = 8
CLIENTS = sized(100, 10)


@dataclass
class Row:
    """One line of the table."""

    name: str
    bytes_per_param: float
    encrypt_s: float
    sum_s: float
    sum_pool_s: float | None
    sum_pool_cpu_s: float | None
    decrypt_s: float
    exact: bool


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _client_lanes(params: HEParams, seed: int = 0) -> npt.NDArray[np.uint64]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << params.bits, params.n_values, dtype=np.uint64)


def measure_secagg(mode: Mode, dim: int, bits: int, clients: int, workers: int = 2) -> Row:
    """Pack, (mask,) encrypt, sum ``clients`` copies (in process, then on a pool of
    ``workers`` processes), decrypt, check exactness."""
    p = select_params(clients, bits, dim, mode)
    secret = ckks.make_secret_context(p)
    sk = ckks.load_secret_context(secret, p)
    server = ckks.load_server_context(ckks.make_public_context(secret), p)
    lanes = _client_lanes(p)
    rng = np.random.default_rng(1)
    mask = None
    if mode == "hybrid":
        mask = ckks.masks_from_words(rng.integers(0, 2**64, p.n_slots, dtype=np.uint64), p)

    def client() -> list[bytes]:
        slots = ckks.pack_lanes(lanes, p)
        if mask is not None:
            slots = ckks.add_masks(slots, mask, p)
        return ckks.encrypt(sk, slots)

    upload, enc_s = _timed(client)
    addend = None
    if mask is not None:  # the sum of `clients` copies of one mask, cancelled in plaintext
        addend = ckks.negate_masks(mask * np.uint64(clients), p)

    def serve() -> list[bytes]:
        return ckks.sum_ciphertexts(server, [upload] * clients, addend)

    summed, sum_s = _timed(serve)
    with ckks.HEWorkerPool(p, ckks.make_public_context(secret), workers=workers) as pool:
        # the pool's workers, found through the public multiprocessing API (named he-worker)
        pids = [c.pid for c in multiprocessing.active_children() if c.name == "he-worker"]
        before = [_cpu_seconds(pid) for pid in pids]
        pooled, pool_s = _timed(lambda: pool.sum_ciphertexts([upload] * clients, addend))
        pool_cpu = max(_cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True))
    slots, dec_s = _timed(lambda: ckks.decrypt(sk, summed))
    exact_pool = bool(np.array_equal(ckks.decrypt(sk, pooled), slots))
    if mode == "hybrid":
        slots = ckks.unmask_sum(slots, p)
    exact = bool(np.array_equal(ckks.unpack_lanes(slots, p), lanes * np.uint64(clients)))
    size = sum(len(c) for c in upload) / dim
    name = f"secagg {p.describe()}"
    return Row(name, size, enc_s, sum_s, pool_s, pool_cpu, dec_s, exact and exact_pool)


def measure_tenseal_vector(dim: int, bits: int, clients: int, *, plain: bool) -> Row:
    """TenSEAL's ``ckks_vector``, real slots only, both polynomials uploaded.

    ``plain=True``: the usual way, one float per slot, public-key context N=8192,
    moduli [60, 40, 40, 60], scale 2^40, TenSEAL's default threads. ``False``: the earlier
    integer baseline, symmetric, N=8192, [60, 60], scale 2^20, two 15-bit lanes per slot,
    ``n_threads=1``.
    """
    n = 8192
    slots = n // 2
    if plain:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=[60, 40, 40, 60])
        ctx.global_scale = 2.0**40
        server = ctx.copy()
        server.make_context_public()
    else:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            n,
            coeff_mod_bit_sizes=[60, 60],
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
            n_threads=1,
        )
        ctx.global_scale = 2.0**20
        server = ts.context_from(
            ctx.serialize(
                save_public_key=False,
                save_secret_key=False,
                save_galois_keys=False,
                save_relin_keys=False,
            ),
            n_threads=1,
        )
    rng = np.random.default_rng(0)
    q = rng.integers(0, 1 << bits, dim, dtype=np.uint64)
    lane_bits = bits + (clients - 1).bit_length()
    if plain:
        values = q.astype(np.float64)
    else:  # two lanes per real slot, lane-major
        half = -(-dim // 2)
        padded = np.zeros(2 * half, dtype=np.uint64)
        padded[:dim] = q
        values = (padded[:half] | (padded[half:] << np.uint64(lane_bits))).astype(np.float64)

    def client() -> list[bytes]:
        return [
            ts.ckks_vector(ctx, values[i : i + slots].tolist()).serialize()
            for i in range(0, values.size, slots)
        ]

    upload, enc_s = _timed(client)

    def serve() -> list[Any]:
        acc = [ts.ckks_vector_from(server, c) for c in upload]
        for _ in range(clients - 1):
            for a, c in zip(acc, upload, strict=True):
                a.add_(ts.ckks_vector_from(server, c))
        return acc

    acc, sum_s = _timed(serve)

    def dec() -> npt.NDArray[np.float64]:
        out = []
        for a in acc:
            a.link_context(ctx)
            out.append(np.asarray(a.decrypt()))
        return np.concatenate(out)

    decoded, dec_s = _timed(dec)
    rounded = np.rint(decoded).astype(np.uint64)
    if plain:
        got = rounded
    else:
        mask = np.uint64((1 << lane_bits) - 1)
        got = np.concatenate([rounded & mask, rounded >> np.uint64(lane_bits)])[:dim]
    exact = bool(np.array_equal(got, q * np.uint64(clients)))
    name = (
        "TenSEAL plain: 1 float/slot, N=8192 [60,40,40,60] 2^40, public key"
        if plain
        else "TenSEAL ckks_vector: symmetric N=8192 [60,60] 2^20, 2x15-bit lanes/real slot"
    )
    size = sum(len(c) for c in upload) / dim
    return Row(name, size, enc_s, sum_s, None, None, dec_s, exact)


def _best(runs: list[Row]) -> Row:
    """Per-column minimum of repeated runs; exact only if every run was."""
    pools = [r.sum_pool_s for r in runs if r.sum_pool_s is not None]
    cpus = [r.sum_pool_cpu_s for r in runs if r.sum_pool_cpu_s is not None]
    return Row(
        runs[0].name,
        min(r.bytes_per_param for r in runs),
        min(r.encrypt_s for r in runs),
        min(r.sum_s for r in runs),
        min(pools) if pools else None,
        min(cpus) if cpus else None,
        min(r.decrypt_s for r in runs),
        all(r.exact for r in runs),
    )


def main() -> None:
    """Print the measurement table (markdown)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--bits", type=int, default=BITS)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--skip-plain", action="store_true", help="skip the slow TenSEAL baselines")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    a = ap.parse_args()
    jobs: list[Callable[[], Row]] = [
        lambda: measure_secagg("ckks", a.dim, a.bits, a.clients),
        lambda: measure_secagg("hybrid", a.dim, a.bits, a.clients),
    ]
    if not a.skip_plain:
        jobs.append(lambda: measure_tenseal_vector(a.dim, a.bits, a.clients, plain=False))
        jobs.append(lambda: measure_tenseal_vector(a.dim, a.bits, a.clients, plain=True))
    rows = [_best([job() for _ in range(a.repeat)]) for job in jobs]
    print(
        f"dim={a.dim} bits={a.bits} clients={a.clients} cpus={os.cpu_count()}, best of {a.repeat}"
    )
    print(
        "| encoding | B/param | encrypt s | sum s, in process | sum s, 2 workers "
        "(max worker CPU s) | decrypt s | exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        pool = "-"
        if r.sum_pool_s is not None:
            pool = f"{r.sum_pool_s:.2f} ({r.sum_pool_cpu_s:.2f})"
        print(
            f"| {r.name} | {r.bytes_per_param:.2f} | {r.encrypt_s:.3f} | {r.sum_s:.2f} "
            f"| {pool} | {r.decrypt_s:.3f} | {r.exact} |"
        )


# --- pytest-benchmark ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["ckks", "hybrid"])
def setup(request: pytest.FixtureRequest) -> tuple[HEParams, Any, Any, list[bytes]]:
    mode: Mode = request.param
    p = select_params(CLIENTS, BITS, DIM, mode)
    secret = ckks.make_secret_context(p)
    sk = ckks.load_secret_context(secret, p)
    server = ckks.load_server_context(ckks.make_public_context(secret), p)
    upload = ckks.encrypt(sk, ckks.pack_lanes(_client_lanes(p), p))
    return p, sk, server, upload


def test_bench_encrypt(benchmark: Any, setup: tuple[HEParams, Any, Any, list[bytes]]) -> None:
    p, sk, _, _ = setup
    slots = ckks.pack_lanes(_client_lanes(p), p)
    benchmark.pedantic(ckks.encrypt, args=(sk, slots), rounds=3, iterations=1)


def test_bench_sum_10_clients(
    benchmark: Any, setup: tuple[HEParams, Any, Any, list[bytes]]
) -> None:
    _, _, server, upload = setup
    benchmark.pedantic(ckks.sum_ciphertexts, args=(server, [upload] * 10), rounds=3)


def test_bench_decrypt(benchmark: Any, setup: tuple[HEParams, Any, Any, list[bytes]]) -> None:
    _, sk, _, upload = setup
    benchmark.pedantic(ckks.decrypt, args=(sk, upload), rounds=3, iterations=1)


if __name__ == "__main__":
    main()
