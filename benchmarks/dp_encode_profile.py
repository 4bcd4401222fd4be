"""Stage-by-stage profile of one DP client's in-round encode and of the decode (docs/dp.md "Speed").

::

    python benchmarks/dp_encode_profile.py [--dim 1000000] [--clients 100] [--threads 1,2]
        [--dp-threads N] [--repeat 5] [--json]

For each Numba thread count in ``--threads`` a fresh process (``NUMBA_NUM_THREADS`` must be set
before Numba starts) runs, with every kernel compiled and warm, and with the DP passes on
``SECAGG_DP_THREADS=--dp-threads`` threads (default: the variable as set, else 1; ``0`` = all
``NUMBA_NUM_THREADS``; the masked kernels always use all):

* the DP client's ``d``-dependent in-round work as the round calls it
  (``DPClient.encode`` with prepared noise, then ``packing.pack_ring``: clip, rotate, scale,
  conditional rounding, add the prepared noise, reduce mod ``2^b``, pack the lanes), and each
  of its stages alone;
* the decode of a released sum as the client and server call it (``packing.unpack_ring``
  then ``encoding.decode_sum``: unpack, centre, scale, rotate back), and its stages;
* the masked client's quantize + pack of the same vector (``secagg.kernels.mask_vector``
  without masks: what the DP encode replaces) and its unpack + dequantize.

The masks themselves are the same OpenSSL pass in both rounds (``kernels.add_masks``), so they
are left out. Each figure is the best of ``--repeat`` runs, wall (``time.perf_counter``) and CPU
(``time.process_time``, all threads of the process: a parallel region's spinning workers count).
The prepared noise is a fixed random integer vector of the plan's spread (its values do not
change the cost). The plan is ``calibrate(3, 1e-5, 100 rounds)`` for ``--clients`` clients and
70% survivors, clip 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Stage = tuple[str, Callable[[], object]]


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm: compile, caches, page faults of the first allocation
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        w1, c1 = time.perf_counter(), time.process_time()
        wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    return wall, cpu


def _stages(dim: int, clients: int) -> tuple[list[Stage], list[Stage], list[Stage]]:
    from secagg import kernels
    from secagg.dp import encoding, rotation
    from secagg.dp.calibration import calibrate
    from secagg.dp.packing import dp_lane_bits, dp_words, pack_ring, unpack_ring
    from secagg.dp.policy import DPOffer
    from secagg.dp.randomness import KeyStream
    from secagg.prg import Purpose
    from secagg.quantize import QuantSpec

    cal = calibrate(
        3.0, 1e-5, 100, n_clients=clients, min_survivors=max(1, (7 * clients) // 10), dim=dim,
        clip=1.0,
    )  # fmt: skip
    offer = DPOffer.from_calibration(cal)
    d = cal.padded_dim
    lane, words = dp_lane_bits(offer.bits, clients), dp_words(offer, clients)
    gen = np.random.default_rng(1)  # public test data only, never for anything secret
    x = gen.normal(0.0, 1.0, dim) * (2.0 / np.sqrt(dim))  # norm ~2: clipped to 1
    sigma = float(np.sqrt(cal.plan.residual_variance(clients)))
    noise = np.rint(gen.normal(0.0, sigma, d)).astype(np.int64)
    rkey, skey, qkey = os.urandom(32), os.urandom(32), os.urandom(32)
    bound = encoding.rounded_norm_bound_sq(offer.clip, offer.gamma, d, offer.beta)

    def encode_round() -> object:
        """What ``DPClient.encode`` + ``dp_masked_words`` do with prepared noise."""
        r = encoding.encode_update(
            x, clip=offer.clip, gamma=offer.gamma, beta=offer.beta, rotation_key=rkey,
            rounding=KeyStream(skey, Purpose.DP_ROUNDING),
        )  # fmt: skip
        r += noise
        return pack_ring(encoding.to_ring(r, offer.bits), lane, words)

    clipped = encoding.clip_l2(x, offer.clip)
    z = rotation.rotate(clipped, rkey) * offer.gamma
    r0 = encoding.conditional_round(z, bound, KeyStream(skey, Purpose.DP_ROUNDING))
    ring = encoding.to_ring(r0 + noise, offer.bits)
    packed = pack_ring(ring, lane, words)
    padded = np.zeros(d)
    padded[:dim] = clipped
    centred = encoding.centre_scaled(ring, offer.bits, offer.gamma)

    encode: list[Stage] = [
        ("encode, as the round calls it", encode_round),
        ("  clip_l2", lambda: encoding.clip_l2(x, offer.clip)),
        ("  rotate (pad, signs, FWHT, 1/sqrt d')", lambda: rotation.rotate(clipped, rkey)),
        ("    sign_vector", lambda: rotation.sign_vector(rkey, d)),
        ("    fwht_inplace", lambda: rotation.fwht_inplace(padded)),
        ("  scale by gamma", lambda: z * 1.0),
        (
            "  conditional_round",
            lambda: encoding.conditional_round(z, bound, KeyStream(skey, Purpose.DP_ROUNDING)),
        ),
        (
            "    rounding coins (KeyStream.words)",
            lambda: KeyStream(skey, Purpose.DP_ROUNDING).words(d),
        ),
        ("  add prepared noise", lambda: r0.copy().__iadd__(noise)),
        ("  to_ring", lambda: encoding.to_ring(r0, offer.bits)),
        ("  pack_ring", lambda: pack_ring(ring, lane, words)),
    ]

    def decode_round() -> object:
        total = unpack_ring(packed, lane, d, offer.bits)
        return encoding.decode_sum(
            total, bits=offer.bits, gamma=offer.gamma, rotation_key=rkey, dim=dim
        )

    decode: list[Stage] = [
        ("decode, as the round calls it", decode_round),
        ("  unpack_ring", lambda: unpack_ring(packed, lane, d, offer.bits)),
        ("  centre_scaled", lambda: encoding.centre_scaled(ring, offer.bits, offer.gamma)),
        ("  unrotate", lambda: rotation.unrotate(centred, rkey, dim)),
    ]

    spec = QuantSpec(clip=1.0, bits=16, n_clients=clients)
    qwords = kernels.mask_vector(x, 1, spec, qkey, [])
    masked: list[Stage] = [
        (
            "masked quantize + pack (mask_vector, no masks)",
            lambda: kernels.mask_vector(x, 1, spec, qkey, []),
        ),
        (
            "masked unpack + dequantize",
            lambda: kernels.dequantize(kernels.unpack(qwords, spec, dim), spec, clients, dim),
        ),
    ]
    return encode, decode, masked


def _child(dim: int, clients: int, repeat: int) -> dict[str, Any]:
    encode, decode, masked = _stages(dim, clients)
    rows = {}
    for name, fn in [*encode, *decode, *masked]:
        wall, cpu = _best(fn, repeat)
        rows[name] = {"wall_ms": round(1e3 * wall, 2), "cpu_ms": round(1e3 * cpu, 2)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument(
        "--threads", default="1,2", help="NUMBA_NUM_THREADS values, comma-separated"
    )
    parser.add_argument("--dp-threads", default=None, help="SECAGG_DP_THREADS for the DP passes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.dim, args.clients, args.repeat)))
        return
    load0 = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for t in args.threads.split(","):
        env = {**os.environ, "NUMBA_NUM_THREADS": t.strip()}
        if args.dp_threads is not None:
            env["SECAGG_DP_THREADS"] = args.dp_threads
        cmd = [sys.executable, __file__, "--child", f"--dim={args.dim}",
               f"--clients={args.clients}", f"--repeat={args.repeat}"]  # fmt: skip
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[t.strip()] = json.loads(out.strip().splitlines()[-1])
    load1 = os.getloadavg()
    if args.json:
        doc = {"dim": args.dim, "load": [load0, load1], "dp_threads": args.dp_threads}
        print(json.dumps({**doc, "threads": results}, indent=1))
        return
    names = list(next(iter(results.values())))
    head = "".join(f" | {t} thr wall ms | {t} thr CPU ms" for t in results)
    dp_threads = args.dp_threads or os.environ.get("SECAGG_DP_THREADS") or "1"
    print(
        f"d = {args.dim}, load average {load0[0]:.2f} -> {load1[0]:.2f}, best of {args.repeat},"
        f" SECAGG_DP_THREADS={dp_threads}"
    )
    print(f"| stage{head} |")
    print("|---" * (1 + 2 * len(results)) + "|")
    for n in names:
        cells = "".join(
            f" | {r[n]['wall_ms']:.1f} | {r[n]['cpu_ms']:.1f}" for r in results.values()
        )
        print(f"| {n.strip() if not n.startswith(' ') else n.replace('  ', '- ', 1)}{cells} |")


if __name__ == "__main__":
    main()
