"""CPU and wall milliseconds of a client's masking-layer calls at each ``SECAGG_MASK_THREADS``.

::

    nice python benchmarks/mask_threads.py --dim 1000000 --clients 100 --reps 7

What one masked client of the goal's round (issue 14: 100 clients x 10^6, 10 neighbours)
runs, each call timed once "cold", as a client runs it, after other work has pushed the
caches out (a 64 MiB array is rewritten before each call): the fused quantize + pack + mask
(1 self mask, 10 pairwise), the decode of the ``AggregateResult`` message, the unpack and
the dequantize of the published sum. CPU milliseconds are ``time.process_time`` (every
thread of the process, spinning workers included), wall milliseconds ``perf_counter``;
medians over ``--reps``. This picks the default of
:data:`secagg.kernels.config.MASK_THREADS_VAR` (docs/kernels.md "Threads").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secagg import kernels
from secagg.kernels.config import MASK_THREADS_VAR
from secagg.messages import AggregateResult, decode_message
from secagg.prg import Purpose, StreamMask
from secagg.quantize import QuantSpec


def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--neighbors", type=int, default=10)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", default="1,2,0", help="values of SECAGG_MASK_THREADS")
    args = parser.parse_args()
    spec = QuantSpec(clip=8.0, bits=16, n_clients=args.clients)
    x = np.random.default_rng(0).uniform(-1, 1, args.dim)  # public test data, not secret
    masks = [
        StreamMask(bytes([i + 1]) * 32, Purpose.PAIR_MASK, 1 - 2 * (i % 2))
        for i in range(args.neighbors)
    ]
    masks.append(StreamMask(bytes(32), Purpose.SELF_MASK, 1))
    words = kernels.mask_vector(x, 1, spec, bytes(32), masks)
    data = AggregateResult(bytes(16), 0, bytes(32), (1, 2), words).encode()
    junk = np.zeros(8 << 20)
    report: dict[str, Any] = {"dim": args.dim, "words": int(words.size)}
    report["load_start"] = os.getloadavg()
    steps: dict[str, Callable[[], Any]] = {
        "mask_vector": lambda: kernels.mask_vector(x, 1, spec, bytes(32), masks),
        "decode_message": lambda: decode_message(data),
        "unpack": lambda: kernels.unpack(words, spec, spec.values(args.dim)),
        "dequantize": lambda: kernels.dequantize(sums, spec, 90, args.dim),
    }
    sums = kernels.unpack(words, spec, spec.values(args.dim))
    for threads in args.threads.split(","):
        os.environ[MASK_THREADS_VAR] = threads
        for step in steps.values():
            step()  # compiled and warm
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        wall: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.reps):
            for name, step in steps.items():
                junk += 1.0  # other work in between: caches cold, as in a round
                c0, w0 = time.process_time(), time.perf_counter()
                step()
                cpu[name].append(1e3 * (time.process_time() - c0))
                wall[name].append(1e3 * (time.perf_counter() - w0))
        report[f"threads={threads}"] = {
            k: {"cpu_ms": _ms(cpu[k]), "wall_ms": _ms(wall[k])} for k in steps
        }
    report["load_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
