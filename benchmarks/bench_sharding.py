"""Sharded rounds (docs/sharding.md): round time against clients, throughput against
workers, and one large exact round, on a local Ray cluster.

Stand-alone (writes ``benchmarks/plots/sharded-results.json`` and the two plots)::

    nice python benchmarks/bench_sharding.py clients [--dim 100] [--max-single 1000]
    nice python benchmarks/bench_sharding.py workers [--clients 2000] [--workers 1,2,4]
    nice python benchmarks/bench_sharding.py big [--clients 10000] [--dim 10000] [--groups 100]
    python benchmarks/bench_sharding.py plot

Every round: no dropout, clients' tolerated dropout 0.01 and corrupt fraction 0.05 (small
SecAgg+ graphs), groups of ``--group-size`` clients. "One group" is the same code with
``G = 1`` on the local engine (a single round plus the join protocol). Wall time is the
whole sharded round: join, group rounds, sum, as :func:`simulate_sharded` reports it.

``make bench`` collects :func:`test_sharded_local_tiny` only (no Ray cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from secagg.simulate import SimulationConfig
from secagg.simulate_sharded import GroupEngine, LocalEngine, simulate_sharded

HERE = Path(__file__).resolve().parent
OUT = HERE / "plots" / "sharded-results.json"


def _cfg(clients: int, dim: int) -> SimulationConfig:
    return SimulationConfig(
        clients=clients, dim=dim, dropout=0.0, tolerated_dropout=0.01, tolerated_corrupt=0.05
    )


def _round(clients: int, dim: int, groups: int, engine: GroupEngine) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    r = simulate_sharded(_cfg(clients, dim), groups, engine)
    assert r["status"] == "completed" and r["exact"], r.get("abort")
    return {
        "clients": clients,
        "dim": dim,
        "groups": groups,
        "engine": r["engine"],
        "workers": r["workers"],
        "wall_s": r["seconds"]["wall"],
        "coordinator_s": r["seconds"]["coordinator"],
        "server_s": r["seconds"]["server"],
        "client_median_s": r["seconds"]["client_median"],
        "exact": r["exact"],
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }


def _ray(workers: int) -> GroupEngine:
    import ray

    from secagg.service.ray_engine import RayEngine

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, workers), include_dashboard=False, log_to_driver=False)
    return RayEngine(n_workers=workers)


def _save(key: str, rows: list[dict[str, Any]]) -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[key] = rows
    data["note"] = "2-core box shared by ~8 engineers; load averages recorded beside every row"
    OUT.write_text(json.dumps(data, indent=1) + "\n")


def run_clients(dim: int, group_size: int, max_single: int, sizes: list[int]) -> None:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        if n <= max_single:
            rows.append({"kind": "one group", **_round(n, dim, 1, LocalEngine())})
            print(rows[-1], flush=True)
        rows.append({"kind": "sharded", **_round(n, dim, max(1, n // group_size), _ray(2))})
        print(rows[-1], flush=True)
        _save("clients", rows)


def run_workers(clients: int, dim: int, group_size: int, workers: list[int]) -> None:
    rows = []
    for w in workers:
        row = _round(clients, dim, clients // group_size, _ray(w))
        row["clients_per_s"] = clients / row["wall_s"]
        rows.append(row)
        print(row, flush=True)
        _save("workers", rows)


def run_big(clients: int, dim: int, groups: int, workers: int) -> None:
    t0 = time.perf_counter()
    row = _round(clients, dim, groups, _ray(workers))
    row["process_s"] = time.perf_counter() - t0
    print(row, flush=True)
    _save("big", [row])


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(OUT.read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("one group", "o"), ("sharded", "s")):
        pts = [r for r in data.get("clients", []) if r["kind"] == kind]
        ax.plot([r["clients"] for r in pts], [r["wall_s"] for r in pts], marker=marker, label=kind)
    ax.set(xscale="log", yscale="log", xlabel="clients", ylabel="round wall time (s)")
    ax.set_title("Round time: one group vs sharded (2 Ray workers, shared 2-core box)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "plots" / "sharded-clients.png", dpi=120)
    rows = data.get("workers", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["workers"] for r in rows], [r["clients_per_s"] for r in rows], marker="o")
        ax.set(xlabel="Ray workers (actors)", ylabel="clients per second")
        ax.set_xticks([r["workers"] for r in rows])
        ax.set_title(
            f"Sharded throughput, {rows[0]['clients']} clients x {rows[0]['dim']} (2-core box)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(HERE / "plots" / "sharded-workers.png", dpi=120)


def test_sharded_local_tiny(benchmark: Any) -> None:
    """pytest-benchmark smoke: a 60-client round in 3 groups on the local engine."""
    r = benchmark.pedantic(
        lambda: simulate_sharded(_cfg(60, 16), 3, LocalEngine()), rounds=1, iterations=1
    )
    assert r["exact"] is True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["clients", "workers", "big", "plot"])
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--groups", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=100)
    ap.add_argument("--max-single", type=int, default=1000)
    ap.add_argument("--sizes", default="100,300,1000,3000,10000")
    ap.add_argument("--workers", default="1,2,4")
    a = ap.parse_args()
    if a.what == "clients":
        sizes = [int(s) for s in a.sizes.split(",")]
        run_clients(a.dim or 100, a.group_size, a.max_single, sizes)
    elif a.what == "workers":
        ws = [int(w) for w in a.workers.split(",")]
        run_workers(a.clients or 2000, a.dim or 100, a.group_size, ws)
    elif a.what == "big":
        n = a.clients or 10_000
        run_big(n, a.dim or 10_000, a.groups or n // a.group_size, 2)
    else:
        plot()


if __name__ == "__main__":
    main()
