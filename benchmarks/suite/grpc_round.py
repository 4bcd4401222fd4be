"""Child process of ``baselines.grpc_rounds``: masked and plaintext rounds over the service.

Run as ``python -m suite.grpc_round CLIENTS DIM REPS`` with ``benchmarks/`` on ``sys.path``.

Uses ``benchmarks/bench_service.py``'s machinery when it imports: one loopback gRPC service
(``start_service``), rounds timed by ``service_round(svc, inputs, mode)`` from the moment
the clients start (round created, channels open) until every client holds the aggregate.
Otherwise ``secagg.service.loopback.simulate_grpc`` (its ``round`` seconds). After a
warm-up, masked and plaintext rounds alternate. One JSON line per round, flushed, so that
a parent which kills a stuck child keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _with_bench_service(clients: int, dim: int, reps: int) -> None:
    import bench_service as bs

    rng = np.random.default_rng(0)
    inputs = [np.clip(rng.normal(0.0, 2.0, dim), -8, 8) for _ in range(clients)]
    svc = bs.start_service(clients)
    _emit({"machinery": "benchmarks/bench_service.py: start_service + service_round"})
    try:
        for mode in ("masked", "plaintext"):  # warm-up: kernels, imports, channels
            try:
                bs.service_round(svc, [x[:1000] for x in inputs], mode)
            except Exception as exc:
                _emit({"mode": mode, "warmup_error": f"{type(exc).__name__}: {exc}"})
        for rep in range(reps):
            for mode in ("masked", "plaintext") if rep % 2 == 0 else ("plaintext", "masked"):
                try:
                    secs, stats, _ = bs.service_round(svc, inputs, mode)
                except Exception as exc:
                    _emit({"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                _emit({
                    "mode": mode,
                    "seconds": secs,
                    "upload_B": statistics.mean(s.protocol_sent for s in stats),
                    "download_B": statistics.mean(s.protocol_received for s in stats),
                })  # fmt: skip
    finally:
        svc.admin.close()
        svc.server.stop()


def _with_loopback(clients: int, dim: int, reps: int) -> None:
    from secagg.service.loopback import simulate_grpc
    from secagg.simulate import SimulationConfig

    _emit({"machinery": "secagg.service.loopback.simulate_grpc (round seconds)"})
    for rep in range(reps):
        for plain in (False, True) if rep % 2 == 0 else (True, False):
            mode = "plaintext" if plain else "masked"
            cfg = SimulationConfig(clients=clients, dim=dim, dropout=0.0, seed=rep)
            try:
                r = simulate_grpc(cfg, plaintext=plain)
            except Exception as exc:
                _emit({"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            if r.get("status") != "completed":
                _emit({"mode": mode, "error": f"round {r.get('status')}: {r.get('abort')}"})
                continue
            _emit({
                "mode": mode,
                "seconds": r["seconds"]["round"],
                "upload_B": r["bytes"]["upload_per_client"],
                "download_B": r["bytes"]["download_per_client"],
            })  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("clients", type=int)
    ap.add_argument("dim", type=int)
    ap.add_argument("reps", type=int)
    ap.add_argument("--loopback", action="store_true", help="skip bench_service's machinery")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if not a.loopback:
        try:
            import bench_service

            assert callable(bench_service.service_round)
            assert callable(bench_service.start_service)
        except Exception as exc:
            _emit({"note": f"bench_service not usable ({type(exc).__name__}: {exc})"})
        else:
            _with_bench_service(a.clients, a.dim, a.reps)
            return 0
    _with_loopback(a.clients, a.dim, a.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
