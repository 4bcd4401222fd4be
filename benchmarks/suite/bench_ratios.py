"""Ratios measured in the same run.

* secure round vs plaintext aggregation: (a) over the loopback gRPC service, masked round
  against the service's INSECURE plaintext round, when that works; (b) in process,
  ``simulate`` against the plaintext stand-in of ``suite.baselines`` (always; labelled);
* CKKS packed (``secagg.ckks``) vs TenSEAL used the plain way;
* Numba CPU kernels vs the numpy/pycryptodome reference (``SECAGG_KERNELS``), for a whole
  round and for the kernels alone;
* GPU vs CPU, when a CUDA device is present (else the row says so; see
  ``benchmarks/gpu_profile.py``).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np
import pytest

from suite import common

PROF = common.profile()


@pytest.mark.benchmark(group="ratio: secure vs plaintext")
@pytest.mark.parametrize("threads", [0, 1], ids=["numba-default-threads", "numba-1-thread"])
def test_secure_vs_plaintext_inprocess(
    benchmark: Any, request: pytest.FixtureRequest, threads: int
) -> None:
    """``threads=1``: the same with one Numba thread. On a busy 2-core box a 2-thread
    parallel region can wait a scheduler slice for its second thread (milliseconds on a
    0.3 ms kernel), which swamps the cheap plaintext round; one thread never waits."""
    import numba

    from secagg.simulate import SimulationConfig, simulate
    from suite.baselines import plaintext_round

    clients, dim = PROF.grpc
    reps = PROF.grpc_reps
    n_threads = threads or numba.config.NUMBA_NUM_THREADS

    def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        sec, pt = [], []
        numba.set_num_threads(n_threads)
        try:
            for rep in range(reps):  # alternate, so drift in the shared machine hits both
                cfg = SimulationConfig(clients=clients, dim=dim, dropout=0.0, seed=rep)
                sec.append(simulate(cfg))
                pt.append(plaintext_round(cfg))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        return sec, pt

    sec, pt = benchmark.pedantic(run, rounds=1, iterations=1)

    def med(rs: list[dict[str, Any]], k: str) -> float:
        return statistics.median(r["seconds"][k] for r in rs)

    row = common.record(
        "ratio",
        "secure-vs-plaintext/inprocess" + ("-1thread" if threads == 1 else ""),
        request.node.nodeid,
        what="masked round (SecAgg+ graph) vs plaintext aggregation, in process",
        numba_threads=n_threads,
        baseline="in-process plaintext sum (stand-in: same codec and kernels, no service)",
        clients=clients,
        dim=dim,
        reps=reps,
        secure_status=[r["status"] for r in sec],
        secure_wall_s=med(sec, "wall"),
        plain_wall_s=med(pt, "wall"),
        secure_server_s=med(sec, "server"),
        plain_server_s=med(pt, "server"),
        secure_client_s=med(sec, "client_median"),
        plain_client_s=med(pt, "client_median"),
        secure_upload_B=sec[0]["bytes"]["upload_per_client"],
        plain_upload_B=pt[0]["bytes"]["upload_per_client"],
        secure_download_B=sec[0]["bytes"]["download_per_client"],
        plain_download_B=pt[0]["bytes"]["download_per_client"],
    )
    row["ratio_wall"] = row["secure_wall_s"] / row["plain_wall_s"]
    row["ratio_server"] = row["secure_server_s"] / row["plain_server_s"]
    row["ratio_client"] = row["secure_client_s"] / row["plain_client_s"]
    row["ratio_upload"] = row["secure_upload_B"] / row["plain_upload_B"]
    benchmark.extra_info.update(ratio_wall=row["ratio_wall"])
    assert all(r["status"] == "completed" and r["exact"] for r in sec)


@pytest.mark.benchmark(group="ratio: secure vs plaintext")
def test_secure_vs_plaintext_grpc(benchmark: Any, request: pytest.FixtureRequest) -> None:
    from suite.baselines import grpc_rounds

    clients, dim = PROF.grpc
    reps, limit = PROF.grpc_reps, PROF.grpc_timeout
    res: dict[str, Any] = benchmark.pedantic(
        grpc_rounds, args=(clients, dim, reps), kwargs={"timeout": limit}, rounds=1, iterations=1
    )

    def summary(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
        if not rounds:
            return None
        return {
            "rounds": len(rounds),
            "seconds": statistics.median(r["seconds"] for r in rounds),
            "upload_B": rounds[0]["upload_B"],
            "download_B": rounds[0]["download_B"],
        }

    s, p = summary(res["masked"]), summary(res["plaintext"])
    row = common.record(
        "ratio",
        "secure-vs-plaintext/grpc",
        request.node.nodeid,
        what="masked round (SecAgg+ graph) vs INSECURE plaintext round, loopback gRPC service",
        machinery=res["machinery"],
        clients=clients,
        dim=dim,
        reps=reps,
        secure=s,
        plain=p,
        errors=res["errors"],
    )
    if s and p:
        row["ratio_round"] = s["seconds"] / p["seconds"]
        row["ratio_upload"] = s["upload_B"] / p["upload_B"]
    benchmark.extra_info.update(ratio=row.get("ratio_round"), errors=res["errors"])
    if s is None:
        pytest.fail(f"no masked gRPC round finished: {res['errors']}")


@pytest.mark.benchmark(group="ratio: ckks packed vs tenseal plain")
@pytest.mark.parametrize("bits", PROF.ckks_bits)
def test_ckks_packed_vs_tenseal(benchmark: Any, request: pytest.FixtureRequest, bits: int) -> None:
    from suite.baselines import ckks_packed, tenseal_plain

    dim, clients = PROF.ckks_dim, PROF.ckks_clients

    def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        return (
            ckks_packed("ckks", dim, bits, clients),
            ckks_packed("hybrid", dim, bits, clients),
            tenseal_plain(dim, bits, clients),
        )

    ours, hybrid, plain = benchmark.pedantic(run, rounds=1, iterations=1)
    row = common.record(
        "ratio",
        f"ckks-vs-tenseal/{bits}bit",
        request.node.nodeid,
        what=f"CKKS upload and time, {bits}-bit values, sum of {clients} uploads",
        dim=dim,
        clients=clients,
        bits=bits,
        packed=ours,
        hybrid=hybrid,
        plain=plain,
        ratio_bytes=plain["bytes_per_param"] / ours["bytes_per_param"],
        ratio_encrypt=plain["encrypt_s"] / ours["encrypt_s"],
        ratio_sum=plain["sum_s"] / ours["sum_s"],
    )
    benchmark.extra_info.update(ratio_bytes=row["ratio_bytes"])
    assert ours["exact"] and hybrid["exact"] and plain["exact"]


@pytest.mark.benchmark(group="ratio: numba vs reference")
def test_numba_vs_reference_round(benchmark: Any, request: pytest.FixtureRequest) -> None:
    from secagg.simulate import SimulationConfig, simulate

    clients, dim = PROF.numba_round
    reps = PROF.numba_reps

    def run() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {"cpu": [], "reference": []}
        for rep in range(reps):
            for name in ("reference", "cpu") if rep % 2 else ("cpu", "reference"):
                cfg = SimulationConfig(
                    clients=clients, dim=dim, dropout=0.1, drop_stage="masked", seed=rep
                )
                with common.backend(name):
                    out[name].append(simulate(cfg))
        return out

    res = benchmark.pedantic(run, rounds=1, iterations=1)

    def med(name: str, k: str) -> float:
        return statistics.median(r["seconds"][k] for r in res[name])

    row = common.record(
        "ratio",
        "numba-vs-reference/round",
        request.node.nodeid,
        what="masked round (SecAgg+ graph, 10% dropout), SECAGG_KERNELS=reference vs cpu",
        clients=clients,
        dim=dim,
        reps=reps,
        neighbors=res["cpu"][0]["neighbors"],
        cpu={k: med("cpu", k) for k in ("wall", "server", "client_median")},
        reference={k: med("reference", k) for k in ("wall", "server", "client_median")},
    )
    for k in ("wall", "server", "client_median"):
        row[f"ratio_{k}"] = row["reference"][k] / row["cpu"][k]
    assert all(r["exact"] for rs in res.values() for r in rs)


@pytest.mark.benchmark(group="ratio: numba vs reference")
def test_numba_vs_reference_kernels(benchmark: Any, request: pytest.FixtureRequest) -> None:
    from secagg import kernels
    from secagg.prg import Purpose, StreamMask
    from secagg.quantize import QuantSpec

    dim, k = PROF.kernel_dim, PROF.kernel_masks
    spec = QuantSpec(clip=3.0, bits=16, n_clients=1000)  # 26-bit lanes, 2 per word
    x = np.random.default_rng(0).normal(size=dim).astype(np.float32)
    rkey = os.urandom(32)
    masks = [StreamMask(os.urandom(32), Purpose.PAIR_MASK, 1 - 2 * (i % 2)) for i in range(k)]
    acc = np.zeros(spec.words(dim), dtype=np.uint64)

    def run() -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, reps in (("cpu", 7), ("reference", 3)):
            with common.backend(name):
                same = kernels.mask_vector(x, 1, spec, rkey, masks)
                t_mask, _ = common.median_time(
                    lambda: kernels.mask_vector(x, 1, spec, rkey, masks), reps
                )
                t_unmask, _ = common.median_time(lambda: kernels.add_masks(acc, masks), reps)
            out[name] = {"mask_s": t_mask, "unmask_s": t_unmask, "digest": float(same.sum())}
        return out

    res = benchmark.pedantic(run, rounds=1, iterations=1)
    common.record(
        "ratio",
        "numba-vs-reference/kernels",
        request.node.nodeid,
        what=(
            f"client fused quantize+pack+mask ({k} masks) and server unmask ({k} seeds), "
            f"{dim:,} params, 26-bit lanes; median of 7 (cpu) / 3 (reference)"
        ),
        dim=dim,
        masks=k,
        cpu=res["cpu"],
        reference=res["reference"],
        ratio_mask=res["reference"]["mask_s"] / res["cpu"]["mask_s"],
        ratio_unmask=res["reference"]["unmask_s"] / res["cpu"]["unmask_s"],
        threads=os.environ.get("NUMBA_NUM_THREADS", str(os.cpu_count())),
    )
    assert res["cpu"]["digest"] == res["reference"]["digest"]


@pytest.mark.benchmark(group="ratio: gpu vs cpu")
def test_gpu_vs_cpu(benchmark: Any, request: pytest.FixtureRequest) -> None:
    from secagg.kernels import config

    present = config.cuda_available() and not config.simulator()
    if not present:
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        common.record(
            "ratio",
            "gpu-vs-cpu",
            request.node.nodeid,
            what="GPU vs CPU kernels",
            present=False,
            note="no CUDA device in this run: see the GPU section (benchmarks/gpu_profile.py)",
        )
        pytest.skip("no CUDA device")
    import sys

    sys.path.insert(0, str(common.BENCH))
    import gpu_profile

    rows = benchmark.pedantic(
        gpu_profile.run_profile, kwargs={"tiny": False, "quick": True}, rounds=1, iterations=1
    )
    common.record(
        "ratio", "gpu-vs-cpu", request.node.nodeid, what="GPU vs CPU kernels", present=True,
        rows=rows,
    )  # fmt: skip
