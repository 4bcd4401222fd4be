"""GPU profile: the GPU rows of ``benchmarks/RESULTS.md`` in one call on a lent GPU.

Measures, GPU (CUDA kernels on device-resident data) against the Numba CPU kernels on the
same machine's cores, same inputs:

* server unmask at 500 and 1,000 clients: the SecAgg+ graph of ``secagg.graph`` (k=272 and
  410), 10% of clients dropped before their masked input, so the server regenerates one
  self mask per survivor and, for every dropped client, the pairwise mask of each of its
  surviving neighbours (the seed count is exact for one random graph); the Shamir
  reconstruction before it is CPU work and not timed here;
* the fused client kernel (quantize + pack + self mask + k pairwise masks) at 500 and
  1,000 clients;
* a 10^8-parameter vector: the fused client kernel at 1,000 clients and the server unmask.

On the lent GPU (wheels and the exact device call: ``docs/benchmarks.md``)::

    python3 benchmarks/gpu_profile.py --json $OUT/gpu_profile.json

then, here, merge its rows into ``benchmarks/RESULTS.md`` (``gpu`` section)::

    python benchmarks/report.py gpu /work/.device/<files_at>/gpu_profile.json

Under Numba's CUDA simulator, to show the script works (tiny sizes, seed counts capped;
timings meaningless; rows go to ``build/bench-tiny/RESULTS.md``)::

    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_profile.py --tiny
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap() -> None:
    """Make ``secagg.kernels`` importable from a bare checkout (as ``gpu_check.py`` does):
    lay out a tree of links shaped like the installed package."""
    try:
        importlib.import_module("secagg.kernels")
        return
    except ImportError:
        pass
    tree = Path(tempfile.mkdtemp(prefix="secagg-pkg-")) / "secagg"
    tree.mkdir()
    for f in (ROOT / "secagg").iterdir():
        (tree / f.name).symlink_to(f)
    (tree / "kernels").symlink_to(ROOT / "kernels")
    for name in [m for m in sys.modules if m == "secagg" or m.startswith("secagg.")]:
        del sys.modules[name]
    sys.path.insert(0, str(tree.parent))


_bootstrap()

from secagg import graph, kernels  # noqa: E402
from secagg.kernels import config  # noqa: E402
from secagg.prg import Purpose, StreamMask  # noqa: E402
from secagg.quantize import QuantSpec  # noqa: E402

CLIENTS = (500, 1000)
DROPOUT = 0.1
CLIP, BITS = 8.0, 16


def _masks(count: int, purpose: Purpose = Purpose.PAIR_MASK) -> list[StreamMask]:
    return [StreamMask(os.urandom(32), purpose, 1 if i % 2 else -1) for i in range(count)]


def unmask_seeds(n: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(k, t, seeds): masks the server regenerates for ``n`` clients, SecAgg+ graph, 10%
    dropped before the masked input: |U2| self masks plus, per dropped client, one
    pairwise mask per surviving neighbour (exact for one random graph)."""
    gp = graph.choose_parameters(n)
    ids = list(range(1, n + 1))
    dropped = {int(c) for c in rng.choice(ids, size=round(DROPOUT * n), replace=False)}
    seed = os.urandom(32)
    pair = sum(len(graph.neighbours_of(ids, gp.degree, seed, w) - dropped) for w in dropped)
    return gp.degree, gp.threshold, (n - len(dropped)) + pair


def _sync_timer(cuda: Any, reps: int) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        fn()  # warm-up (and compilation)
        cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def _cpu_timer(reps: int) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        old = os.environ.get(config.ENV_VAR)
        os.environ[config.ENV_VAR] = "cpu"
        try:
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        finally:
            if old is None:
                os.environ.pop(config.ENV_VAR, None)
            else:
                os.environ[config.ENV_VAR] = old

    return run


def run_profile(*, tiny: bool, quick: bool = False, dim: int | None = None,
                big: int | None = None, reps: int = 5,
                cpu_seeds: int = 256) -> list[dict[str, Any]]:  # fmt: skip
    """Measure and return the rows (without machine/date/command: :func:`main` adds them).

    ``tiny``: simulator sizes (64 parameters, at most 3 masks). ``quick``: 10^6 and 10^7
    instead of 10^7 and 10^8 (what ``make bench`` runs when it finds a GPU).
    """
    from numba import cuda

    dim = dim or (64 if tiny else 10**6 if quick else 10**7)
    big = big or (96 if tiny else 10**7 if quick else 10**8)
    if tiny:
        reps, cpu_seeds = 1, 2
    cap = 3 if tiny else None  # the simulator runs every CUDA thread in Python
    gpu_t, cpu_t = _sync_timer(cuda, reps), _cpu_timer(reps)
    rng = np.random.default_rng()
    rows: list[dict[str, Any]] = []

    def add(key: str, name: str, setting: str, g: float, c: float, note: str = "") -> None:
        rows.append({"id": f"gpu/{key}", "name": name, "setting": setting, "gpu_s": g,
                     "cpu_s": c, "ratio": c / g if g > 0 else None, "note": note})  # fmt: skip
        print(f"  {name:55s} {setting:45s} GPU {g * 1e3:10.3f} ms  CPU {c * 1e3:10.3f} ms"
              f"  {c / g if g > 0 else 0:8.1f}x  {note}", flush=True)  # fmt: skip

    def unmask(n: int, d: int, key: str) -> None:
        k, t, seeds = unmask_seeds(n, rng)
        used = min(seeds, cap) if cap else seeds
        spec = QuantSpec(clip=CLIP, bits=BITS, n_clients=n)
        words = spec.words(d)
        masks = _masks(used, Purpose.SELF_MASK)
        dacc = cuda.to_device(rng.integers(0, 1 << 63, size=words, dtype=np.uint64))
        g = gpu_t(lambda: kernels.add_masks(dacc, masks))
        acc = rng.integers(0, 1 << 63, size=words, dtype=np.uint64)
        c_used = min(used, cpu_seeds)
        c = cpu_t(lambda: kernels.add_masks(acc, masks[:c_used])) * used / c_used
        note = f"{seeds:,} seeds"
        if used < seeds:
            note += f" (simulator: {used} timed)"
        if c_used < used:
            note += f"; CPU timed on {c_used} seeds, scaled by {used / c_used:.1f} (linear)"
        add(key, f"server unmask, {n:,} clients", f"{d:,} params ({words:,} words), k={k}, t={t}",
            g, c, note)  # fmt: skip

    def client(n: int, d: int, key: str, k: int | None = None) -> None:
        gp = graph.choose_parameters(n)
        k = gp.degree if k is None else k
        used = min(k + 1, cap) if cap else k + 1
        spec = QuantSpec(clip=CLIP, bits=BITS, n_clients=n)
        masks = [*_masks(1, Purpose.SELF_MASK), *_masks(used - 1)]
        x = rng.normal(0, CLIP / 4, d).astype(np.float32)
        dx = cuda.to_device(x)
        rkey = os.urandom(32)
        out_gpu = kernels.mask_vector(dx, 1, spec, rkey, masks)
        out_cpu = kernels.mask_vector(x, 1, spec, rkey, masks)
        same = bool(np.array_equal(np.asarray(out_gpu.copy_to_host()), out_cpu))
        g = gpu_t(lambda: kernels.mask_vector(dx, 1, spec, rkey, masks))
        c = cpu_t(lambda: kernels.mask_vector(x, 1, spec, rkey, masks))
        note = f"{used} masks (self + {used - 1} pairwise); GPU == CPU bits: {same}"
        add(key, f"client fused quantize+pack+mask, {n:,} clients",
            f"{d:,} float32 params, {spec.lane_bits}-bit lanes", g, c, note)  # fmt: skip
        if not same:
            raise SystemExit("GPU and CPU results differ")

    print(f"\nGPU profile ({'simulator, tiny' if tiny else 'quick' if quick else 'full'})",
          flush=True)  # fmt: skip
    for n in CLIENTS:
        unmask(n, dim, f"unmask/{n}/{dim}")
    for n in CLIENTS:
        client(n, dim, f"client/{n}/{dim}")
    client(CLIENTS[-1], big, f"client/{CLIENTS[-1]}/{big}")
    unmask(CLIENTS[-1], big, f"unmask/{CLIENTS[-1]}/{big}")
    return rows


def _device_name(cuda: Any) -> str:
    if config.simulator():
        return "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    return f"{name} (cc {dev.compute_capability[0]}.{dev.compute_capability[1]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="simulator sizes")
    ap.add_argument("--quick", action="store_true", help="10^6 / 10^7 instead of 10^7 / 10^8")
    ap.add_argument("--dim", type=int, help="parameters for the 500/1,000-client rows")
    ap.add_argument("--big", type=int, help="parameters of the large-vector rows (10^8)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--cpu-seeds",
        type=int,
        default=256,
        help="time the CPU unmask on at most this many seeds, scale linearly",
    )
    ap.add_argument("--json", type=Path, help="write {meta, rows} here (for report.py gpu)")
    ap.add_argument("--results", type=Path,
                    help="RESULTS file to update (default benchmarks/RESULTS.md; "
                         "build/bench-tiny/RESULTS.md with --tiny)")  # fmt: skip
    ap.add_argument("--no-results", action="store_true", help="write no RESULTS file")
    a = ap.parse_args()
    from numba import cuda

    if not config.cuda_available():
        print("no CUDA device (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")
        return 2
    sim = config.simulator()
    if sim and not a.tiny:
        print("the simulator runs only --tiny sizes")
        return 2
    if sim:
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)  # numpy scalars warn on wrap-around
    import numba

    device = _device_name(cuda)
    host = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}")  # fmt: skip
    versions = f"numba {numba.__version__}, numpy {np.__version__}"
    try:
        from importlib import metadata

        versions += f", numba-cuda {metadata.version('numba-cuda')}"
    except Exception:  # a version string is a nicety
        pass
    print(f"device: {device}; host: {host}; {versions}", flush=True)
    t0 = time.time()
    rows = run_profile(tiny=a.tiny, quick=a.quick, dim=a.dim, big=a.big, reps=a.reps,
                       cpu_seeds=a.cpu_seeds)  # fmt: skip
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%MZ")
    command = " ".join(["python3", "benchmarks/gpu_profile.py", *sys.argv[1:]])
    if sim:
        command = "NUMBA_ENABLE_CUDASIM=1 " + command
    for r in rows:
        r.update(device=device, machine=f"{device}; {host}", date=date, command=command,
                 simulator=sim, suite="gpu")  # fmt: skip
    meta = {"date": date, "device": device, "host": host, "versions": versions,
            "simulator": sim, "wall_s": time.time() - t0, "command": command}  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {a.json}")
    if not a.no_results:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import report

        default = ROOT / ("build/bench-tiny/RESULTS.md" if a.tiny else "benchmarks/RESULTS.md")
        path = a.results or default
        report.update_gpu(rows, meta, path)
        print(f"gpu section written to {path}")
    print(f"{len(rows)} rows in {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
