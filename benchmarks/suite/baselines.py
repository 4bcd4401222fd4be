"""Baselines the secure rounds are compared with, and the exact per-client byte counts.

* :func:`plaintext_round`: the in-process **plaintext aggregation stand-in**. Each client
  quantizes and packs its input with the same Numba kernel as a masked client (no masks),
  sends it as a ``MaskedInput`` message through the same codec, the server adds the words
  and sends every client the same ``AggregateResult`` the masked protocol sends; the client
  unpacks and dequantizes it. No keys, no shares, no masks: the cost of aggregation alone.
* :func:`grpc_rounds`: rounds over the real loopback gRPC service
  (``secagg.service.loopback.simulate_grpc``), masked or INSECURE plaintext, each in a child
  process with a time limit (the service is still changing; a broken plaintext round must
  not stall the suite).
* :func:`ckks_packed` and ``bench_ckks.measure_tenseal_vector(plain=True)``: our packed CKKS
  against TenSEAL used the plain way.
* :func:`masked_client_bytes`: exact bytes a surviving client sends and receives in a masked
  round without dropouts, from the protocol's own encoder (messages of the right sizes
  built and encoded).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from suite.common import BENCH, ROOT


def _inputs(cfg: Any) -> dict[int, np.ndarray[Any, Any]]:
    """The same test data as ``secagg.simulate.simulate`` for the same seed."""
    rng = np.random.default_rng(cfg.seed)
    return {
        cid: np.clip(rng.normal(0.0, cfg.clip / 4, cfg.dim), -cfg.clip, cfg.clip)
        for cid in range(1, cfg.clients + 1)
    }


def plaintext_round(cfg: Any) -> dict[str, Any]:
    """One in-process plaintext aggregation (the stand-in baseline); no dropouts."""
    from secagg import kernels
    from secagg.keys import random_seed
    from secagg.messages import AggregateResult, MaskedInput, decode_message
    from secagg.params import make_params
    from secagg.quantize import dequantize

    params = make_params(cfg.clients, cfg.dim, clip=cfg.clip, bits=cfg.bits)
    spec = params.quant
    values = spec.values(cfg.dim)
    rid = params.round_id
    sid = hashlib.sha256(b"bench/plaintext" + params.digest()).digest()
    inputs = _inputs(cfg)
    keys = {c: random_seed() for c in inputs}
    client_s = dict.fromkeys(inputs, 0.0)
    server_s = 0.0
    up = down = 0
    acc = np.zeros(params.words, dtype=np.uint64)
    wall0 = time.perf_counter()
    for cid, x in inputs.items():
        t0 = time.perf_counter()
        words = kernels.mask_vector(x, 1, spec, keys[cid], [])
        data = MaskedInput(rid, cid, sid, words).encode()
        t1 = time.perf_counter()
        msg = decode_message(data)
        assert isinstance(msg, MaskedInput)
        acc += msg.words
        t2 = time.perf_counter()
        client_s[cid] += t1 - t0
        server_s += t2 - t1
        up = len(data)
    t0 = time.perf_counter()
    result = AggregateResult(rid, 0, sid, tuple(inputs), acc).encode()
    server_s += time.perf_counter() - t0
    total = None
    for cid in inputs:
        t0 = time.perf_counter()
        msg = decode_message(result)
        assert isinstance(msg, AggregateResult)
        sums = kernels.unpack(msg.words, spec, values)
        total, _ = dequantize(sums, spec, len(msg.contributors), cfg.dim)
        client_s[cid] += time.perf_counter() - t0
        down = len(result)
    wall = time.perf_counter() - wall0
    float_sum = np.sum(list(inputs.values()), axis=0)
    assert total is not None
    return {
        "status": "completed",
        "max_abs_error": float(np.max(np.abs(total - float_sum))),
        "seconds": {
            "client_median": statistics.median(client_s.values()),
            "server": server_s,
            "wall": wall,
        },
        "bytes": {"upload_per_client": up, "download_per_client": down},
    }


def grpc_rounds(clients: int, dim: int, reps: int, *, timeout: float) -> dict[str, Any]:
    """Masked and plaintext rounds over the loopback gRPC service, alternating, in one child
    process (``suite.grpc_round``) limited to ``timeout`` seconds.

    Returns ``{"machinery": str, "masked": [round, ...], "plaintext": [...], "errors": [...]}``
    with each round ``{"seconds", "upload_B", "download_B"}``; rounds that finished before a
    failure or the time limit are kept.
    """
    cmd = [sys.executable, "-m", "suite.grpc_round", str(clients), str(dim), str(reps)]
    path = os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out: dict[str, Any] = {"machinery": "?", "masked": [], "plaintext": [], "errors": []}
    try:
        res = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        stdout, stderr, code = res.stdout, res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or b""
        stdout = raw.decode() if isinstance(raw, bytes) else raw
        stderr, code = "", None
        out["errors"].append(f"child killed after {timeout:.0f} s")
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        if "machinery" in msg:
            out["machinery"] = msg["machinery"]
        elif "note" in msg:
            out["errors"].append(msg["note"])
        elif "error" in msg or "warmup_error" in msg:
            out["errors"].append(f"{msg['mode']}: {msg.get('error') or msg.get('warmup_error')}")
        else:
            out[msg["mode"]].append(msg)
    if code not in (0, None):
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        out["errors"].append(f"child exit {code}: {tail[:300]}")
    return out


def ckks_packed(mode: str, dim: int, bits: int, clients: int) -> dict[str, Any]:
    """Our encoding (``secagg.ckks``): pack, (mask,) encrypt one client's lanes, sum
    ``clients`` copies in process, decrypt, check. Times in seconds, sizes per parameter."""
    from secagg import ckks
    from secagg.he_params import select_params

    p = select_params(clients, bits, dim, mode)  # type: ignore[arg-type]
    secret = ckks.make_secret_context(p)
    sk = ckks.load_secret_context(secret, p)
    server = ckks.load_server_context(ckks.make_public_context(secret), p)
    rng = np.random.default_rng(0)
    lanes = rng.integers(0, 1 << bits, p.n_values, dtype=np.uint64)
    mask = None
    if mode == "hybrid":
        mask = ckks.masks_from_words(rng.integers(0, 2**64, p.n_slots, dtype=np.uint64), p)
    t0 = time.perf_counter()
    slots = ckks.pack_lanes(lanes, p)
    if mask is not None:
        slots = ckks.add_masks(slots, mask, p)
    upload = ckks.encrypt(sk, slots)
    t1 = time.perf_counter()
    addend = None if mask is None else ckks.negate_masks(mask * np.uint64(clients), p)
    summed = ckks.sum_ciphertexts(server, [upload] * clients, addend)
    t2 = time.perf_counter()
    out = ckks.decrypt(sk, summed)
    t3 = time.perf_counter()
    if mode == "hybrid":
        out = ckks.unmask_sum(out, p)
    exact = bool(np.array_equal(ckks.unpack_lanes(out, p), lanes * np.uint64(clients)))
    return {
        "encoding": p.describe(),
        "bytes_per_param": sum(len(c) for c in upload) / dim,
        "encrypt_s": t1 - t0,
        "sum_s": t2 - t1,
        "decrypt_s": t3 - t2,
        "exact": exact,
    }


def tenseal_plain(dim: int, bits: int, clients: int) -> dict[str, Any]:
    """TenSEAL the plain way: one float per real slot, ``ckks_vector``, N=8192,
    [60, 40, 40, 60], scale 2^40 (``bench_ckks.measure_tenseal_vector(plain=True)``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from bench_ckks import measure_tenseal_vector

    r = measure_tenseal_vector(dim, bits, clients, plain=True)
    return {
        "encoding": r.name,
        "bytes_per_param": r.bytes_per_param,
        "encrypt_s": r.encrypt_s,
        "sum_s": r.sum_s,
        "decrypt_s": r.decrypt_s,
        "exact": r.exact,
    }


def masked_client_bytes(n: int, k: int, dim: int, bits: int = 16) -> dict[str, int]:
    """Exact bytes one client sends and receives in a masked round of ``n`` clients, graph
    degree ``k``, no dropouts: every message built at its real size and encoded."""
    from secagg.messages import (
        SHARE_CIPHERTEXT_BYTES,
        SHARE_COMMIT_BYTES,
        AdvertiseKeys,
        AggregateResult,
        ConsistencyRequest,
        ConsistencySignature,
        MaskedInput,
        NonceReveal,
        NonceReveals,
        Roster,
        ShareDelivery,
        ShareKeys,
        UnmaskRequest,
        UnmaskShares,
    )
    from secagg.quantize import QuantSpec
    from secagg.shamir import SHARE_BYTES

    rid, sid = bytes(16), bytes(32)
    words = np.zeros(QuantSpec(clip=8.0, bits=bits, n_clients=n).words(dim), dtype=np.uint64)
    peers = tuple(range(2, k + 2))
    ids = tuple(range(1, n + 1))
    ct = bytes(SHARE_CIPHERTEXT_BYTES)
    commit = bytes(SHARE_COMMIT_BYTES)  # H_seed | H_key | the dealer's signature
    share = bytes(SHARE_BYTES)

    def adv(cid: int) -> AdvertiseKeys:
        return AdvertiseKeys(rid, cid, bytes(32), bytes(32), bytes(32), bytes(64), bytes(32))

    holders = (1, *peers)
    sent = {
        "advertise": adv(1),
        "reveal": NonceReveal(rid, 1, sid, bytes(32)),
        "share": ShareKeys(
            rid, 1, sid, tuple((v, ct) for v in peers), tuple((v, commit) for v in holders)
        ),
        "input": MaskedInput(rid, 1, sid, words),
        "consistency": ConsistencySignature(rid, 1, sid, bytes(64)),
        # its own seed share and one per neighbour, all alive
        "unmask": UnmaskShares(rid, 1, sid, tuple((v, share) for v in (1, *peers)), ()),
    }
    received = {
        "advertise": Roster(rid, 0, tuple(adv(c) for c in ids)),
        "reveal": NonceReveals(rid, 0, sid, tuple((c, bytes(32)) for c in ids)),
        "share": ShareDelivery(
            rid, 0, sid, tuple((v, ct) for v in peers), tuple((v, commit) for v in peers)
        ),
        "input": ConsistencyRequest(rid, 0, sid, ids),
        "consistency": UnmaskRequest(rid, 0, sid, ids, (), tuple((c, bytes(64)) for c in ids)),
        "result": AggregateResult(rid, 0, sid, ids, words),
    }
    out = {f"up_{s}": len(m.encode()) for s, m in sent.items()}
    out.update({f"down_{s}": len(m.encode()) for s, m in received.items()})
    out["upload"] = sum(v for s, v in out.items() if s.startswith("up_"))
    out["download"] = sum(v for s, v in out.items() if s.startswith("down_"))
    out["masked_vector"] = 8 * words.size
    out["words"] = int(words.size)
    return out
