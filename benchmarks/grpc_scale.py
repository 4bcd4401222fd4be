"""One large round over loopback gRPC, clients in worker processes on asyncio event loops.

``python benchmarks/grpc_scale.py --clients 1000 --dim 100000 --dropout 0.1 --processes 2``
runs :func:`secagg.service.loopback.simulate_grpc` with ``workers="async"`` (each worker
process runs its share of the clients as :class:`secagg.service.aio_client.AsyncClient`
coroutines on one event loop) and reports, beside the usual JSON report (``exact``: the
published sum equals the plaintext sum of the survivors' quantized inputs, and every
survivor received it), the **wall and CPU seconds of each stage** for the server process and
for the client processes together. Each process samples ``(time.monotonic(),
time.process_time())`` every ``--sample`` seconds; the server process also samples the
round's stage (admin status). A stage's CPU seconds are the CPU each process spent between
the stage's first and last sample, so they are exact to one sampling period.

``--profile FILE`` writes a cProfile of every thread of the server process (the event loop
and the round workers) to FILE (``pstats``), and prints its top entries by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import os
import pstats
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from secagg.service import loopback as lb
from secagg.service.admin import AdminClient
from secagg.simulate import SimulationConfig

Sample = tuple[float, float]
"""(monotonic seconds, CPU seconds of the process)."""


class _Sampler:
    def __init__(self, period: float, probe: Callable[[], str] | None = None) -> None:
        self.samples: list[Sample] = []
        self.stages: list[tuple[float, str]] = []
        self._period, self._probe = period, probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), time.process_time()))

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), time.process_time()))
            if self._probe is not None:
                stage = self._probe()
                if stage and (not self.stages or self.stages[-1][1] != stage):
                    self.stages.append((time.monotonic(), stage))
            if self._stop.wait(self._period):
                return


def _cpu_at(samples: list[Sample], t: float) -> float:
    """CPU seconds of a process at monotonic time ``t`` (linear between samples)."""
    if not samples:
        return 0.0
    times = [s[0] for s in samples]
    i = bisect_right(times, t)
    if i == 0:
        return samples[0][1]  # before the process's first sample: its imports do not count
    if i == len(samples):
        return samples[-1][1]
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)


_PERIOD = 0.25


def _group(jobs: list[lb.ClientJob]) -> tuple[list[Any], list[Sample]]:
    """A worker process: its clients on one event loop, and its CPU samples."""
    with _Sampler(_PERIOD) as sampler:
        out = lb.run_async_group(jobs)
    return out, sampler.samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=float, default=_PERIOD, help="sampling period, s")
    parser.add_argument("--profile", default=None, help="cProfile of the server process")
    args = parser.parse_args()
    cfg = SimulationConfig(clients=args.clients, dim=args.dim, dropout=args.dropout, seed=args.seed)
    worker_samples: list[list[Sample]] = []

    def runner(jobs: list[lb.ClientJob]) -> list[Any]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        p = args.processes
        groups = [jobs[i::p] for i in range(p)]
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(p, mp_context=ctx) as pool:
            results = list(pool.map(_group, groups))
        order: dict[int, Any] = {}
        for g, (res, samples) in enumerate(results):
            worker_samples.append(samples)
            for k, o in enumerate(res):
                order[g + k * p] = o
        return [order[i] for i in range(len(jobs))]

    profiles: list[cProfile.Profile] = []
    if args.profile:

        def start_profile(*_: object) -> None:
            prof = cProfile.Profile()
            profiles.append(prof)
            sys.setprofile(None)
            prof.enable()

        threading.setprofile(start_profile)  # every server thread started from now on

    # The server's stage, polled from a sampler in this (the server's) process.
    state: dict[str, Any] = {}

    def on_round(admin: AdminClient, round_id: bytes) -> None:
        state["probe"] = (admin, round_id)

    load0 = os.getloadavg()
    wall0 = time.perf_counter()
    server_sampler = _Sampler(args.sample, lambda: _stage(state))
    try:
        with server_sampler:
            report = lb.simulate_grpc(cfg, client_runner=runner, on_round=on_round)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        for prof in profiles:
            prof.disable()
    report.pop("dropped", None)
    report["transport"]["workers"] = "async"
    report["processes"] = args.processes
    report["stage_cpu_seconds"] = _per_stage(server_sampler, worker_samples)
    report["cpu_seconds"] = {
        "server_process": server_sampler.samples[-1][1] - server_sampler.samples[0][1],
        "client_processes": sum(s[-1][1] - s[0][1] for s in worker_samples if s),
    }
    report["wall_seconds"] = time.perf_counter() - wall0
    report["load_average"] = {"start": load0, "end": os.getloadavg()}
    report.pop("client_errors", None)
    print(json.dumps(report))
    if args.profile and profiles:
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            stats.add(prof)
        stats.dump_stats(args.profile)
        stats.sort_stats("tottime").print_stats(25)


def _stage(state: dict[str, Any]) -> str:
    probe = state.get("probe")
    if probe is None:
        return ""
    admin, rid = probe
    try:
        return str(admin.status(rid).stage)
    except Exception:  # the round ended and the admin client closed
        return ""


def _per_stage(server: _Sampler, workers: list[list[Sample]]) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each stage seen by the sampler (server, clients)."""
    out: dict[str, dict[str, float]] = {}
    marks = [*server.stages, (server.samples[-1][0], "end")]
    for (t0, stage), (t1, _next) in itertools.pairwise(marks):
        if stage in ("completed", "aborted"):
            continue
        out[stage] = {
            "wall": round(t1 - t0, 3),
            "server_cpu": round(_cpu_at(server.samples, t1) - _cpu_at(server.samples, t0), 3),
            "clients_cpu": round(sum(_cpu_at(w, t1) - _cpu_at(w, t0) for w in workers), 3),
        }
    return out


if __name__ == "__main__":
    main()
