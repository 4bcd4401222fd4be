"""One call on a GPU: every CUDA kernel bit-exact against the CPU path, then a timing table.

On the lent GPU (the wheels and the exact command are in ``docs/kernels.md``)::

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json

Under Numba's CUDA simulator, to check that the script itself works (tiny sizes; the
timings are host-clock and meaningless)::

    NUMBA_ENABLE_CUDASIM=1 python benchmarks/gpu_check.py --tiny

Without any GPU but with the CUDA toolkit's libnvvm, nvrtc and ptxas, compile every kernel
for sm_90 and print ptxas' register / spill report (``--ptx``).

Method (``/work/.library/device/METHOD.md``): fresh random inputs for every check, the
ceilings measured in the same run (device-to-device copy: bytes read + written; the
keystream kernel alone; keystream generated in registers with no stores), CUDA-event timing
after a warm-up, median of ``--reps`` runs, inputs rotated among two sets. The exit status is
1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap() -> None:
    """Make ``secagg.kernels`` importable from a bare checkout (no ``pip install -e``).

    The package maps ``kernels/`` to ``secagg.kernels``; without an install, lay out a tree
    of links as the installed package would be.
    """
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

from secagg.kernels import chacha, config  # noqa: E402
from secagg.kernels import cpu as kcpu  # noqa: E402
from secagg.prg import Purpose, StreamMask, keystream_bytes, nonce_for  # noqa: E402
from secagg.quantize import QuantSpec  # noqa: E402

FAILURES: list[str] = []
RESULTS: dict[str, Any] = {"checks": [], "timings": []}


def check(name: str, ok: bool) -> None:
    RESULTS["checks"].append({"name": name, "ok": bool(ok)})
    print(f"  {'PASS' if ok else 'FAIL'}  {name}", flush=True)
    if not ok:
        FAILURES.append(name)


def _masks(k: int, rng: np.random.Generator) -> list[StreamMask]:
    return [
        StreamMask(os.urandom(32), Purpose(int(rng.integers(1, 6))), int(s))
        for s in rng.choice([1, -1], size=k)
    ]


def _params(spec: QuantSpec, dim: int, weight: int, masks: list[StreamMask]) -> tuple[Any, ...]:
    keys, nonces, signs = chacha.mask_params(masks)
    return (
        dim, weight, spec.weighted, spec.lanes_per_word, spec.lane_bits, float(spec.clip),
        spec.scale, spec.max_level, chacha.key_words(os.urandom(32)),
        chacha.nonce_words(nonce_for(Purpose.ROUNDING)), keys, nonces, signs, spec.words(dim),
    )  # fmt: skip


# --- correctness ----------------------------------------------------------------------------


def run_checks(cuda: Any, K: Any, tiny: bool, rng: np.random.Generator) -> None:
    print("\nbit-exact checks (CUDA vs Numba CPU, fresh random inputs)", flush=True)
    big = 40 if tiny else (1 << 20) + 7

    key, nonce = os.urandom(32), os.urandom(12)
    kw, nw = chacha.key_words(key), chacha.nonce_words(nonce)
    for first, count in [(0, 1), (3, 5), (int(rng.integers(1 << 31)), 3 if tiny else 1 << 16)]:
        got = K.keystream_words(kw, nw, first, count).copy_to_host()
        check(f"keystream blocks {first}+{count}", np.array_equal(got, kcpu.keystream_words(
            kw, nw, first, count)))  # fmt: skip
    got = K.keystream_words(kw, chacha.nonce_words(nonce_for(Purpose.PAIR_MASK)), 2, 2)
    check("keystream vs pycryptodome", got.copy_to_host().tobytes() == keystream_bytes(
        key, Purpose.PAIR_MASK, 128, 128))  # fmt: skip

    specs = [
        QuantSpec(2.0, 16, 1000),  # L=26, P=2
        QuantSpec(1.0, 8, 50, max_weight=9),  # L=18, P=3, weighted
        QuantSpec(1.0, 32, 3),  # L=34, P=1
        QuantSpec(3.0, 1, 1),  # L=1, P=64
    ]
    dims = [1, 17] if tiny else [0, 1, 2031, 2 * 2032 + 1, big]
    for spec in specs[: 2 if tiny else 4]:
        for dim in dims:
            for k in (0, 2) if tiny else (0, 1, 5):
                dtype = np.float32 if (dim + k) % 2 else np.float64
                x = (rng.normal(size=dim) * spec.clip * 1.3).astype(dtype)
                if dim > 4:
                    x[:4] = [spec.clip, -spec.clip, np.inf, -0.0]
                weight = int(rng.integers(1, spec.max_weight + 1))
                p = _params(spec, dim, weight, _masks(k, rng))
                want, _ = kcpu.mask_vector(x, *p)
                got, nan = K.mask_vector(cuda.to_device(x), *p)
                check(f"fused mask L={spec.lane_bits} dim={dim} k={k} {np.dtype(dtype).name}",
                      np.array_equal(got.copy_to_host(), want) and not nan)  # fmt: skip
    x = rng.normal(size=33 if tiny else big)
    x[-1] = np.nan
    _, nan = K.mask_vector(cuda.to_device(x), *_params(specs[0], x.size, 1, []))
    check("fused mask reports NaN", nan)

    for words in [9, 2049] if tiny else [1, 2049, (1 << 22) + 5]:
        for k in (2,) if tiny else (1, 16):
            acc = rng.integers(0, 1 << 64, size=words, dtype=np.uint64)
            keys, nonces, signs = chacha.mask_params(_masks(k, rng))
            dacc = cuda.to_device(acc)
            K.add_masks(dacc, keys, nonces, signs)
            kcpu.add_masks(acc, keys, nonces, signs)
            check(f"add_masks words={words} k={k}", np.array_equal(dacc.copy_to_host(), acc))

    for spec in specs:
        words = rng.integers(0, 1 << 64, size=13 if tiny else 100_003, dtype=np.uint64)
        count = words.size * spec.lanes_per_word - 2
        got = K.unpack(cuda.to_device(words), spec.lane_bits, count).copy_to_host()
        want = kcpu.unpack(words, spec.lanes_per_word, spec.lane_bits, count)
        check(f"unpack L={spec.lane_bits}", np.array_equal(got, want))
        dim = count - 1 if spec.weighted else count
        offset = 3.0 * spec.clip
        got_f = K.dequantize(cuda.to_device(want), dim, spec.scale, offset).copy_to_host()
        want_f = kcpu.dequantize(want, dim, spec.scale, offset)
        check(f"dequantize L={spec.lane_bits}", got_f.tobytes() == want_f.tobytes())

    from secagg import kernels

    os.environ.pop(config.ENV_VAR, None)
    x = rng.normal(size=30).astype(np.float32)
    out = kernels.mask_vector(cuda.to_device(x), 1, specs[0], os.urandom(32), [])
    check("auto dispatch: device in -> device out", kernels.is_device_array(out))


# --- timing ---------------------------------------------------------------------------------


def timer(cuda: Any, reps: int, warmup: int) -> Callable[[Callable[[int], Any]], float]:
    """Median seconds of ``fn(i)`` (``i`` rotates input sets) by CUDA events after warm-up."""

    def run(fn: Callable[[int], Any]) -> float:
        for i in range(warmup):
            fn(i)
        cuda.synchronize()
        times = []
        for i in range(reps):
            start, end = cuda.event(), cuda.event()
            t0 = time.perf_counter()
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            times.append(ms / 1e3 if ms >= 0 else time.perf_counter() - t0)  # simulator: -1
        return statistics.median(times)

    return run


def row(name: str, t: float, **cols: Any) -> None:
    RESULTS["timings"].append({"name": name, "seconds": t, **cols})


def run_timings(cuda: Any, K: Any, tiny: bool, log2_params: int, reps: int) -> None:
    print("\ntimings (median of CUDA-event times)", flush=True)
    rng = np.random.default_rng()
    T = timer(cuda, reps, 1 if tiny else 3)
    tpb = config.CUDA_THREADS

    # Ceiling 1: device-to-device copy, bytes read + written.
    n_copy = (1 << 12) if tiny else (1 << 30)
    src = [cuda.to_device(rng.integers(0, 255, n_copy, dtype=np.uint8)) for _ in range(2)]
    dst = cuda.device_array(n_copy, dtype=np.uint8)
    t = T(lambda i: dst.copy_to_device(src[i % 2]))
    copy_bw = 2 * n_copy / t
    row("d2d copy (numba)", t, GBps=copy_bw / 1e9)
    try:
        torch = importlib.import_module("torch")
        if torch.cuda.is_available() and not tiny:
            a = torch.randint(0, 255, (n_copy,), dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            t_t = T(lambda i: b.copy_(a))
            row("d2d copy (torch)", t_t, GBps=2 * n_copy / t_t / 1e9)
            copy_bw = max(copy_bw, 2 * n_copy / t_t)
    except ImportError:
        pass

    # Ceiling 2: the keystream kernel alone (blocks to global memory).
    key_w = [chacha.key_words(os.urandom(32)).reshape(1, 8) for _ in range(2)]
    dkeys = [cuda.to_device(k) for k in key_w]
    dnonce = cuda.to_device(chacha.nonce_words(os.urandom(12)).reshape(1, 3))
    n_blocks = 64 if tiny else 1 << 24
    ks_out = cuda.device_array(16 * n_blocks, dtype=np.uint32)
    grid = K._grid(-(-n_blocks // tpb))
    t = T(lambda i: K._keystream_kernel[grid, tpb](dkeys[i % 2], dnonce, 0, n_blocks, ks_out))
    ks_rate = 64 * n_blocks / t
    row("keystream kernel", t, GBps=ks_rate / 1e9, Gblocks_s=n_blocks / t / 1e9)

    # Keystream generated in registers, nothing stored per key: add_masks with 64 seeds.
    words = 1 << 10 if tiny else 1 << 23
    acc = cuda.to_device(rng.integers(0, 1 << 64, size=words, dtype=np.uint64))
    seeds = 2 if tiny else 64
    mk = [cuda.to_device(a) for a in chacha.mask_params(_masks(seeds, rng))]
    grid_a = K._grid(-(-words // (16 * tpb)))
    t = T(lambda i: K._add_masks_kernel[grid_a, tpb](acc, *mk))
    gen_rate = seeds * 8 * words / t
    row(f"keystream in registers ({seeds} seeds)", t, GBps=gen_rate / 1e9)

    # Fused quantize + pack + mask at 2^log2_params float32 params.
    spec = QuantSpec(2.0, 16, 1000)
    dim = 1 << log2_params
    n_words = spec.words(dim)
    xs = [cuda.to_device(rng.normal(size=dim).astype(np.float32)) for _ in range(2)]
    out = cuda.device_array(n_words, dtype=np.uint64)
    flag = cuda.to_device(np.zeros(1, dtype=np.int32))
    grid_m = K._grid(-(-n_words // config.CUDA_TILE_WORDS))
    for k in (0, 1, 2) if tiny else (0, 1, 8, 16, 64):
        p = _params(spec, dim, 1, _masks(k, rng))
        dev = [cuda.to_device(np.ascontiguousarray(a)) for a in (
            p[8].reshape(1, 8), p[9].reshape(1, 3), p[10], p[11], p[12])]  # fmt: skip
        scal = (np.int64(dim), np.bool_(False), np.uint64(1), np.int64(spec.lanes_per_word),
                np.int64(spec.lane_bits), np.float64(spec.clip), np.float64(spec.scale),
                np.int64(spec.max_level))  # fmt: skip

        def launch(i: int, p_dev: list[Any] = dev, s: tuple[Any, ...] = scal) -> None:
            K._mask_kernel[grid_m, tpb](xs[i % 2], *s, *p_dev, out, flag)

        t = T(launch)
        nbytes = 4 * dim + 8 * n_words
        blocks = -(-dim // 16) + k * -(-n_words // 8)
        floor = max(nbytes / copy_bw, 64 * blocks / gen_rate)
        row(
            f"fused mask 2^{log2_params} k={k}",
            t,
            Gparams_s=dim / t / 1e9,
            GBps=nbytes / t / 1e9,
            ks_GBps=64 * blocks / t / 1e9,
            pct_ceiling=100 * floor / t,
        )

    # The public API on the same input (host->device key copies and the NaN flag read-back).
    from secagg import kernels

    masks16 = _masks(2 if tiny else 16, rng)
    rkey = os.urandom(32)
    t = T(lambda i: kernels.mask_vector(xs[i % 2], 1, spec, rkey, masks16))
    row(f"kernels.mask_vector 2^{log2_params} k={len(masks16)}", t, Gparams_s=dim / t / 1e9)

    # Server unmask: many seeds summed into the aggregate in place.
    for seeds in (2,) if tiny else (16, 64, 256):
        mk = [cuda.to_device(a) for a in chacha.mask_params(_masks(seeds, rng))]
        acc = cuda.device_array(n_words, dtype=np.uint64)
        grid_u = K._grid(-(-n_words // (16 * tpb)))
        t = T(lambda i, m=mk, a=acc, g=grid_u: K._add_masks_kernel[g, tpb](a, *m))
        blocks = seeds * -(-n_words // 8)
        floor = max(16 * n_words / copy_bw, 64 * blocks / gen_rate)
        row(
            f"server unmask {seeds} seeds x {n_words} words",
            t,
            seeds_s=seeds / t,
            ks_GBps=64 * blocks / t / 1e9,
            pct_ceiling=100 * floor / t,
        )

    if not tiny:
        launch_bound_variants(cuda, K, T, spec, dim, xs, out, flag, grid_m, rng)


def launch_bound_variants(cuda: Any, K: Any, T: Any, spec: QuantSpec, dim: int, xs: Any,
                          out: Any, flag: Any, grid_m: int, rng: Any) -> None:  # fmt: skip
    """The fused kernel at k=16 compiled with other register budgets, to tune the bound."""
    p = _params(spec, dim, 1, _masks(16, rng))
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in (
        p[8].reshape(1, 8), p[9].reshape(1, 3), p[10], p[11], p[12])]  # fmt: skip
    scal = (np.int64(dim), np.bool_(False), np.uint64(1), np.int64(spec.lanes_per_word),
            np.int64(spec.lane_bits), np.float64(spec.clip), np.float64(spec.scale),
            np.int64(spec.max_level))  # fmt: skip
    tpb = config.CUDA_THREADS
    for per_sm in (None, 4, 6, 8):
        opts = {} if per_sm is None else {"launch_bounds": (tpb, per_sm)}
        kern = cuda.jit(**opts)(K._mask_kernel.py_func)
        g = min(grid_m, K._sm_count() * (per_sm or 4))
        t = T(lambda i, kk=kern, gg=g: kk[gg, tpb](xs[i % 2], *scal, *dev, out, flag))
        regs = None
        with contextlib.suppress(Exception):  # the count is a nicety, not a check
            regs = int(next(iter(kern.get_regs_per_thread().values())))
        row(f"fused k=16 launch_bounds={opts.get('launch_bounds')}", t, regs=regs,
            Gparams_s=dim / t / 1e9)  # fmt: skip


def print_table() -> None:
    print("\n| case | ms | numbers |\n| --- | ---: | --- |")
    for r in RESULTS["timings"]:
        extra = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in r.items() if k not in ("name", "seconds")
        )  # fmt: skip
        print(f"| {r['name']} | {r['seconds'] * 1e3:.3f} | {extra} |")


# --- offline PTX / ptxas report ---------------------------------------------------------------


def ptx_report() -> None:
    """Compile every kernel for sm_90 without a GPU and print ptxas' resource usage.

    numba-cuda asks the current device for its compute capability when a kernel calls a
    device function; with no driver, that lookup is answered with (9, 0) here.
    """
    import numba.cuda.dispatcher as disp

    class _Device:
        compute_capability = (9, 0)

    disp.get_current_device = lambda: _Device()  # type: ignore[attr-defined]
    from numba import cuda

    K = importlib.import_module("secagg.kernels.cuda")
    a32, a64, u64 = "uint32[:,:]", "float64", "uint64"
    sigs = {
        "_keystream_kernel": f"void({a32}, {a32}, int64, int64, uint32[:])",
        "_mask_kernel": f"void(float32[:], int64, boolean, {u64}, int64, int64, {a64}, {a64},"
        f" int64, {a32}, {a32}, {a32}, {a32}, int64[:], uint64[:], int32[:])",
        "_add_masks_kernel": f"void(uint64[:], {a32}, {a32}, int64[:])",
        "_unpack_kernel": f"void(uint64[:], int64, {u64}, uint64[:])",
        "_dequantize_kernel": f"void(uint64[:], {a64}, {a64}, float64[:])",
    }
    bounds = (config.CUDA_THREADS, config.CUDA_BLOCKS_PER_SM)
    ptxas = os.environ.get("PTXAS", "ptxas")
    for name, sig in sigs.items():
        ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=(9, 0), launch_bounds=bounds)
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, "-arch=sm_90", "-v", "-o", os.devnull, f.name], capture_output=True, text=True
        )
        info = " ".join(
            ln.split(":", 1)[-1].strip()
            for ln in res.stderr.splitlines()
            if "Used" in ln or "spill" in ln
        )
        print(f"{name:20s} fma.rn.f64={'fma.rn.f64' in ptx} {info}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (simulator)")
    ap.add_argument("--ptx", action="store_true", help="offline: compile and print ptxas -v")
    ap.add_argument("--log2-params", type=int, default=26)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write checks and timings here")
    ap.add_argument("--no-timings", action="store_true")
    a = ap.parse_args()
    if a.ptx:
        ptx_report()
        return 0
    tiny = a.tiny or config.simulator()
    from numba import cuda

    if not cuda.is_available():
        print("no CUDA device (set NUMBA_ENABLE_CUDASIM=1 for the simulator)")
        return 2
    K = importlib.import_module("secagg.kernels.cuda")
    if config.simulator():
        import warnings

        warnings.simplefilter("ignore", RuntimeWarning)  # numpy scalars warn on wrap-around
        print("device: CUDA simulator")
    else:
        dev = cuda.get_current_device()
        print(f"device: {dev.name!r} cc {dev.compute_capability}, {K._sm_count()} SMs")
    import numba

    print(f"numba {numba.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    RESULTS["device"] = "simulator" if config.simulator() else str(cuda.get_current_device().name)
    run_checks(cuda, K, tiny, np.random.default_rng())
    if not a.no_timings:
        run_timings(cuda, K, tiny, 6 if tiny else a.log2_params, 1 if tiny else a.reps)
        print_table()
    print(f"\n{len(RESULTS['checks']) - len(FAILURES)} passed, {len(FAILURES)} failed")
    if a.json:
        a.json.write_text(json.dumps(RESULTS, indent=1, default=str))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
