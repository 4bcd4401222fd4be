"""One in-process round with per-party CPU seconds instead of wall seconds (shared boxes).

``python benchmarks/scale_cpu.py --clients 1000 --dim 100000 --dropout 0.1`` runs
:func:`secagg.simulate.simulate` with its stopwatch (``time.perf_counter``) replaced by
``time.process_time``, so ``client_median`` and ``server`` are the CPU seconds (all threads of
the process) of each party's calls: on a box shared with other jobs these track what an idle
box's wall clock would show for single-threaded work, where ``secagg simulate --json``'s wall
seconds grow with the load. Parallel kernels count every core's time (an upper bound on their
wall time). Prints the simulate report plus ``wall_seconds`` (real) and the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types

from secagg import simulate as sim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--neighbors", default="auto")
    parser.add_argument("--threshold", default="auto")
    parser.add_argument("--tolerate-dropout", type=float, default=None)
    parser.add_argument("--tolerate-corrupt", type=float, default=None)
    parser.add_argument("--dp-epsilon", type=float, default=None, help="DP round (docs/dp.md)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds the DP budget covers")
    parser.add_argument("--dp-clip", type=float, default=None)
    parser.add_argument("--dp-prepare", action="store_true", help="noise drawn before the round")
    args = parser.parse_args()
    cfg = sim.SimulationConfig(
        clients=args.clients,
        dim=args.dim,
        dropout=args.dropout,
        neighbors=args.neighbors,
        threshold=args.threshold,
        tolerated_dropout=args.tolerate_dropout,
        tolerated_corrupt=args.tolerate_corrupt,
        dp_epsilon=args.dp_epsilon,
        dp_rounds=args.rounds,
        dp_clip=args.dp_clip,
        dp_prepare=args.dp_prepare,
    )
    load0 = os.getloadavg()
    wall0 = time.perf_counter()
    real_time = sim.time
    sim.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore[assignment]
    try:
        report = sim.simulate(cfg)
    finally:
        sim.time = real_time
    report.pop("dropped", None)
    report["cpu_seconds"] = report.pop("seconds")
    report["wall_seconds"] = time.perf_counter() - wall0
    report["load_average"] = {"start": load0, "end": os.getloadavg()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
