"""Distributed-DP client cost: exact discrete Gaussian throughput and one client's DP encoding.

pytest-benchmark suite (``make bench`` runs it with the others)::

    pytest benchmarks/bench_dp.py --benchmark-only

Stand-alone table (best of ``--repeat`` runs)::

    python benchmarks/bench_dp.py [--dim 1000000] [--clients 100] [--survivors 70] [--repeat 3]
        [--backend cpu|cuda] [--server-dim 65536] [--no-client]

Reported: samples/s of the noise kernel (``secagg.dp.streams.discrete_gaussian_vector``,
Numba, all cores) and of the batched numpy sampler (``secagg.dp.sampling.discrete_gaussian``)
at the calibrated base variance; keystream words per sample (the Python reference, counted);
one client's pipeline (clip, rotate, round, all XNoise components, reduce mod 2^b) at
``--dim``, split into the input-dependent part (encode, add, reduce: the critical path when
the noise is drawn ahead, docs/dp.md "Speed") and the noise; the server's removal for
``--clients`` survivors (nobody dropped: all ``m`` removable, the most work) at
``--server-dim`` with its ``s j d'`` samples/s and the time that rate gives at ``--dim``; and
the components / release ratio trade-off over ``max_excess``. The plan is that of
``--clients`` / ``--survivors`` at epsilon 3, delta 1e-5, 100 rounds. CPU time is
``time.process_time`` (all threads).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from suite.common import sized

from secagg.dp import streams
from secagg.dp.calibration import DPCalibration, calibrate
from secagg.dp.encoding import encode_update, to_ring
from secagg.dp.randomness import KeyStream
from secagg.dp.sampling import discrete_gaussian
from secagg.dp.streams import discrete_gaussian_vector
from secagg.dp.xnoise import client_noise, make_plan, removal_noise
from secagg.prg import Purpose

BENCH_DIM = sized(100_000, 4096)


def _cal(dim: int, n: int, t: int, max_excess: float = 0.05) -> DPCalibration:
    return calibrate(
        3.0, 1e-5, 100, n_clients=n, min_survivors=t, dim=dim, clip=1.0, max_excess=max_excess
    )


def client_noise_only(cal: DPCalibration, backend: str = "cpu") -> np.ndarray:
    """The input-independent part: every noise component of one client, summed."""
    keys = [os.urandom(32) for _ in range(cal.plan.components)]
    return client_noise(cal.plan, keys, cal.padded_dim, backend=backend)


def client_finish(cal: DPCalibration, x: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The input-dependent part: encode the update, add the noise, reduce mod 2^b."""
    r = encode_update(
        x,
        clip=cal.clip,
        gamma=cal.gamma,
        beta=cal.beta,
        rotation_key=os.urandom(32),
        rounding=KeyStream(os.urandom(32), Purpose.DP_ROUNDING),
    )
    return to_ring(r + noise, cal.bits)


def client_round(cal: DPCalibration, x: np.ndarray, backend: str = "cpu") -> np.ndarray:
    """One client's DP work: encode the update, add every noise component, reduce mod 2^b."""
    return client_finish(cal, x, client_noise_only(cal, backend))


def words_per_sample(sigma2: int, samples: int = 2000) -> float:
    """32-bit keystream words the reference reads per coordinate (one chunk after another)."""

    class Counting(streams.ChunkWords):
        __slots__ = ("n",)
        n: int

        def next(self) -> int:
            self.n += 1
            return super().next()

    used = 0
    for c in range(-(-samples // streams.COORDS_PER_STREAM)):
        w = Counting(os.urandom(32), c)
        w.n = 0
        for _ in range(min(streams.COORDS_PER_STREAM, samples - c * streams.COORDS_PER_STREAM)):
            w.discrete_gaussian(sigma2, 1)
        used += w.n
    return used / samples


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best wall time and the CPU time of that run."""
    best, cpu = float("inf"), 0.0
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t = time.perf_counter() - t0
        if t < best:
            best, cpu = t, time.process_time() - c0
    return best, cpu


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.benchmark(group="dp")
def test_discrete_gaussian_throughput(benchmark: Any) -> None:
    cal = _cal(BENCH_DIM, 100, 70)
    v = cal.plan.component_variances[-1]
    benchmark(lambda: discrete_gaussian_vector(os.urandom(32), v, 100_000))


@pytest.mark.benchmark(group="dp")
def test_dp_client_round(benchmark: Any) -> None:
    cal = _cal(BENCH_DIM, 100, 70)
    x = np.linspace(-1, 1, BENCH_DIM)
    benchmark(lambda: client_round(cal, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--survivors", type=int, default=70)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda"], help="noise kernel")
    ap.add_argument("--server-dim", type=int, default=1 << 16, help="d' of the removal bench")
    ap.add_argument("--no-client", action="store_true", help="skip the one-client pipeline")
    a = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared box?)")
    cal = _cal(a.dim, a.clients, a.survivors)
    v = cal.plan.component_variances[-1]
    count = min(a.dim, 1_000_000)
    discrete_gaussian_vector(os.urandom(32), v, 16, backend=a.backend)  # compile / load cache
    t, cpu = _timed(
        lambda: discrete_gaussian_vector(os.urandom(32), v, count, backend=a.backend), a.repeat
    )
    print(
        f"noise kernel ({a.backend}) sigma^2={v}: {count / t:,.0f} samples/s, "
        f"{count / cpu:,.0f} per CPU-second ({count} in {t:.3f} s)"
    )
    print(f"keystream: {words_per_sample(v):.2f} 32-bit words per sample (reference, counted)")
    t, _ = _best_and_nothing(
        lambda: discrete_gaussian(KeyStream(os.urandom(32), Purpose.DP_NOISE), v, count), a.repeat
    )
    print(f"batched numpy sampler: {count / t:,.0f} samples/s ({count} in {t:.3f} s)")
    samples = cal.plan.components * cal.padded_dim
    if not a.no_client:
        x = np.linspace(-1, 1, a.dim)
        t, cpu = _timed(lambda: client_round(cal, x, a.backend), a.repeat)
        print(
            f"client DP round: dim={a.dim} (d'={cal.padded_dim}), {cal.plan.components} "
            f"components, {cal.bits}-bit ring: {t:.3f} s wall, {cpu:.3f} s CPU "
            f"({samples / t:,.0f} noise samples/s incl. encoding)"
        )
        noise = client_noise_only(cal, a.backend)
        t_in, cpu_in = _timed(lambda: client_finish(cal, x, noise), a.repeat)
        t_nz, cpu_nz = _timed(lambda: client_noise_only(cal, a.backend), a.repeat)
        print(
            f"  split: input-dependent (encode + add + reduce) {t_in:.3f} s wall "
            f"{cpu_in:.3f} s CPU; noise (input-independent) {t_nz:.3f} s wall {cpu_nz:.3f} s CPU"
        )
    # Server: every survivor's removable components, nobody dropped (all m: the most work).
    s_cal = _cal(a.server_dim, a.clients, a.survivors)
    plan = s_cal.plan
    j = plan.level(a.clients)
    keys = {i: [os.urandom(32) for _ in range(j)] for i in range(a.clients)}
    d = s_cal.padded_dim
    t, cpu = _timed(lambda: removal_noise(plan, keys, a.clients, d, backend=a.backend), 1)
    rate = a.clients * j * d / t
    full = a.clients * j * cal.padded_dim
    print(
        f"server removal: s={a.clients} x j={j} x d'={d} = {a.clients * j * d:,} samples in "
        f"{t:.2f} s wall, {cpu:.2f} s CPU: {rate:,.0f} samples/s; at d'={cal.padded_dim}: "
        f"{full:,} samples, ~{full / rate:.0f} s at this rate"
    )
    print("max_excess  components  max_release_ratio  server j at s=n")
    for xi in (0.05, 0.1, 0.2, 0.3, 0.5):
        p = make_plan(cal.plan.target_variance, a.clients, a.survivors, max_excess=xi)
        print(
            f"{xi:9.2f}  {p.components:10d}  {p.max_release_ratio:17.4f}  {p.level(a.clients):15d}"
        )


def _best_and_nothing(fn: Callable[[], object], repeat: int) -> tuple[float, None]:
    return _best(fn, repeat), None


if __name__ == "__main__":
    main()
