"""Our client's and Flower's client compute in CPU seconds, on the same workload (issue 14).

::

    nice python benchmarks/flower_cpu.py --clients 100 --dim 1000000      # the goal's setting
    nice python benchmarks/flower_cpu.py --clients 14 --dim 1000 --flower none   # smoke

Workload: ``benchmarks/suite/bench_flower.py``'s ``sparse`` one -- ours ``--neighbors 10
--threshold 6`` (policy told to assume no corrupt client and no dropout, as Flower's clients
do), Flower ``num_shares=11, reconstruction_threshold=6``; both fed the inputs and the 10%
dropout plan (before the masked vector) of :func:`secagg.simulate.simulation_inputs`.

Both stopwatches are ``time.process_time`` (CPU seconds of the whole process, every thread),
which on a box shared with other jobs tracks what an idle box's wall clock shows for
single-threaded work:

* ours: :func:`secagg.simulate.simulate` with its stopwatch swapped (as
  ``benchmarks/scale_cpu.py``). A client's compute is every ``start``/``receive`` call of its
  :class:`~secagg.client.SecAggClient`: decoding each server message from bytes, key
  generation and agreement, signing and checking, Shamir dealing and share decryption, the
  fused quantize + pack + mask, the consistency and unmasking answers, and -- the last call
  -- **decoding the published aggregate** (the 8 MB result message, unpack, dequantize);
  not the encoding of its own replies (the simulation's transport does that);
* Flower: ``suite.flower_round`` (flwr's own ``SecAggPlusWorkflow`` and ``secaggplus_mod``)
  in ``.venv-flower`` with its stopwatch swapped likewise. A client's compute is its
  ``ClientApp`` calls: Flower's message handling and mods, key generation, Shamir shares,
  quantization and the ``RandomState`` masks, the unmask answer; not the protobuf
  serialisation (timed apart as ``wire_s``). **Flower's clients never receive the
  aggregate** (the ``ServerApp`` keeps it).

So the same-work figure is ours *without* the aggregate decode: ``ratio_same_work`` =
Flower / ours-without-decode is what the goal is judged on; ``ratio_as_timed`` (ours with it)
is printed beside it. Medians are over the clients that sent a masked vector. Prints one JSON
object with both sides, the ratios and the load averages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

from secagg import client as client_mod
from secagg import simulate as sim

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

_FLOWER = """
import json, sys, time, types
import suite.flower_round as fr
fr.time = types.SimpleNamespace(perf_counter=time.process_time)
import logging
from flwr.supercore import logger
logger.FLOWER_LOGGER.setLevel(logging.ERROR)
n, dim, shares, t = (int(a) for a in sys.argv[1:5])
print(json.dumps(fr.flower_round(n, dim, shares, t, float(sys.argv[5]), "masked", 0)))
"""


def ours(clients: int, dim: int, dropout: float) -> dict[str, Any]:
    """One round of ours on CPU seconds; per-client totals and the aggregate decode apart."""
    cfg = sim.SimulationConfig(
        clients=clients, dim=dim, dropout=dropout, drop_stage="masked", neighbors="10",
        threshold="6", seed=0, tolerated_dropout=0.0, tolerated_corrupt=0.0,
    )  # fmt: skip
    total: dict[int, float] = defaultdict(float)
    decode: dict[int, float] = defaultdict(float)
    start, receive = client_mod.SecAggClient.start, client_mod.SecAggClient.receive

    def timed_start(self: client_mod.SecAggClient, now: float = 0.0) -> Any:
        t0 = time.process_time()
        out = start(self, now)
        total[self.client_id] += time.process_time() - t0
        return out

    def timed(self: client_mod.SecAggClient, message: Any, now: float = 0.0) -> Any:
        done = self.done
        t0 = time.process_time()
        out = receive(self, message, now)
        spent = time.process_time() - t0
        total[self.client_id] += spent
        if not done and self.result is not None:  # this call took the aggregate
            decode[self.client_id] += spent
        return out

    real_time = sim.time  # type: ignore[attr-defined]
    sim.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore[attr-defined,assignment]
    client_mod.SecAggClient.start = timed_start  # type: ignore[method-assign]
    client_mod.SecAggClient.receive = timed  # type: ignore[method-assign]
    try:
        report = sim.simulate(cfg)
    finally:
        sim.time = real_time  # type: ignore[attr-defined]
        client_mod.SecAggClient.start = start  # type: ignore[method-assign]
        client_mod.SecAggClient.receive = receive  # type: ignore[method-assign]
    assert report["status"] == "completed" and report["exact"], report.get("error")
    senders = list(decode)  # the clients that sent a masked vector got the aggregate
    return {
        "client_median_cpu_s": report["seconds"]["client_median"],
        "decode_median_cpu_s": statistics.median(decode[c] for c in senders),
        "client_median_without_decode_cpu_s": statistics.median(
            total[c] - decode[c] for c in senders
        ),
        "server_cpu_s": report["seconds"]["server"],
        "round_cpu_s": report["seconds"]["wall"],
        "neighbors": report["neighbors"],
        "threshold": report["threshold"],
        "survivors": report["survivors"],
    }


def flower(python: Path, clients: int, dim: int, dropout: float) -> dict[str, Any]:
    """One Flower round in the Flower environment, its stopwatch on CPU seconds."""
    path = os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    res = subprocess.run(
        [str(python), "-c", _FLOWER, str(clients), str(dim), "11", "6", str(dropout)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"Flower round failed: exit {res.returncode}: {tail[:300]}")
    out: dict[str, Any] = json.loads(lines[-1])
    return {
        "status": out["status"],
        "client_median_cpu_s": out["client_median_s"],
        "server_cpu_s": out["server_s"],
        "round_cpu_s": out["wall_s"],
        "max_abs_error": out["max_abs_error"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument(
        "--flower", default=str(ROOT / ".venv-flower" / "bin" / "python"),
        help="the Flower environment's python, or 'none' to time ours only",
    )  # fmt: skip
    args = parser.parse_args()
    load0 = os.getloadavg()
    wall0 = time.perf_counter()
    report: dict[str, Any] = {"clients": args.clients, "dim": args.dim, "dropout": args.dropout}
    report["ours"] = mine = ours(args.clients, args.dim, args.dropout)
    if args.flower != "none":
        report["flower"] = theirs = flower(Path(args.flower), args.clients, args.dim, args.dropout)
        f = theirs["client_median_cpu_s"]
        report["ratio_same_work"] = f / mine["client_median_without_decode_cpu_s"]
        report["ratio_as_timed"] = f / mine["client_median_cpu_s"]
    report["wall_seconds"] = time.perf_counter() - wall0
    report["load_average"] = {"start": load0, "end": os.getloadavg()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
