"""Round drivers the suite needs beyond ``secagg.simulate.simulate``.

* :func:`staged_round`: one round in process, like ``simulate.run_round`` (same drop
  semantics: a dropped client stops sending from its drop stage on, the fake clock jumps to
  the stage deadline), but timing and counting bytes **per stage**.
* :func:`memory_round`: the same round with the server, one probe client and all other
  clients in three separate ``spawn``ed processes, messages passed as bytes through pipes,
  so that each process's peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
  is that of one role.

Inputs and rounding keys are derived from ``(seed, client id)`` so that every process can
make its own clients' data and the parent can check the result. Benchmark data only.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import resource
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STAGES = ("advertise", "share", "input", "consistency", "unmask", "result")

UP_STAGE = {1: "advertise", 7: "advertise", 2: "share", 3: "input", 6: "input", 4: "consistency",
            5: "unmask", 10: "result", 11: "result"}  # fmt: skip
"""Client message type -> stage it belongs to (reveal_nonces counts as part of advertise)."""
DOWN_STAGE = {16: "advertise", 23: "advertise", 17: "share", 18: "input", 19: "consistency",
              20: "result", 22: "result", 21: "result"}  # fmt: skip
"""Server message type -> stage that produced it (the roster ends the advertise stage...)."""
WORK_STAGE = {16: "advertise", 23: "share", 17: "input", 18: "consistency", 19: "unmask",
              20: "result", 22: "result", 21: "result"}  # fmt: skip
"""Server message type -> stage of the work a client does on receiving it."""
SERVER_STAGE = {"advertise_keys": "advertise", "reveal_nonces": "advertise", "share_keys": "share",
                "masked_input": "input",
                "encrypted_input": "input", "consistency": "consistency",
                "unmasking": "unmask"}  # fmt: skip

_TYPE_OFFSET = 5  # magic "SAGG" (4 bytes) | version u8 | type u8


def msg_type(data: bytes) -> int:
    return data[_TYPE_OFFSET]


@dataclass(frozen=True)
class RoundSpec:
    """Everything a process needs to build its part of one round (picklable)."""

    params: Any  # secagg.params.RoundParams
    ids: tuple[int, ...]
    plan: dict[int, Any]  # client -> secagg.rounds.base.Stage it never reaches
    seed: int
    clip: float
    he_secret: bytes | None = None
    he_public: bytes | None = None
    timeout: float = 10.0

    def _derive(self, label: bytes, cid: int) -> bytes:
        data = label + self.seed.to_bytes(8, "big") + cid.to_bytes(4, "big")
        return hashlib.sha256(data).digest()

    def identity_seed(self, cid: int) -> bytes:
        return self._derive(b"bench/identity", cid)

    def rounding_key(self, cid: int) -> bytes:
        return self._derive(b"bench/rounding", cid)

    def vector(self, cid: int) -> np.ndarray[Any, Any]:
        rng = np.random.default_rng([self.seed, cid])
        x: np.ndarray[Any, Any] = np.clip(
            rng.normal(0.0, self.clip / 4, self.params.dim), -self.clip, self.clip
        )
        return x


def make_spec(cfg: Any) -> RoundSpec:
    """A round spec from a :class:`secagg.simulate.SimulationConfig` (same parameters and
    dropout schedule rules as ``simulate``; different random inputs)."""
    import random

    from secagg import ckks
    from secagg.params import Mode, make_params
    from secagg.rounds.base import Stage
    from secagg.simulate import schedule

    params = make_params(
        cfg.clients,
        cfg.dim,
        mode=Mode.parse(cfg.mode),
        clip=cfg.clip,
        bits=cfg.bits,
        max_weight=cfg.max_weight,
        neighbors=cfg.neighbors,
        threshold=cfg.threshold,
    )
    if cfg.max_weight != 1:
        raise ValueError("the suite's drivers run unweighted rounds")
    ids = tuple(range(1, cfg.clients + 1))
    plan = schedule(cfg, list(ids), random.Random(cfg.seed))
    secret = public = None
    if params.mode is not Mode.MASKED:
        secret = ckks.make_secret_context(params.he)
        public = ckks.make_public_context(secret)
    if params.mode is Mode.CKKS:
        plan = {c: Stage.MASKED_INPUT for c in plan}
    return RoundSpec(params, ids, plan, cfg.seed, cfg.clip, secret, public)


def _encode_all(out: list[tuple[int, Any]]) -> list[tuple[int, bytes]]:
    """Encode the server's outgoing messages, once per distinct message: a broadcast (the
    roster, the result) is one bytes object shared by all recipients, as a server would
    hold it, not one copy per client."""
    cache: dict[int, bytes] = {}
    enc = []
    for c, m in out:
        data = cache.get(id(m))
        if data is None:
            data = cache[id(m)] = m.encode()
        enc.append((c, data))
    return enc


class Host:
    """The server or a set of clients of one round, driven by bytes."""

    def __init__(self, spec: RoundSpec, role: str, cids: tuple[int, ...] = ()) -> None:
        from secagg import ckks
        from secagg.client import SecAggClient
        from secagg.he_round import CkksClient, CkksServer
        from secagg.keys import IdentityKey
        from secagg.params import Mode
        from secagg.server import SecAggServer, StageTimeouts

        p = spec.params
        self.spec = spec
        directory = {c: IdentityKey(spec.identity_seed(c)).public for c in spec.ids}
        self.server: Any = None
        self.clients: dict[int, Any] = {}
        if role == "server":
            he = None
            if spec.he_public is not None:
                he = ckks.load_server_context(spec.he_public, p.he)
            if p.mode is Mode.CKKS:
                assert he is not None
                self.server = CkksServer(p, directory, he, timeout=spec.timeout, now=0.0)
            else:
                timeouts = StageTimeouts.uniform(spec.timeout)
                self.server = SecAggServer(p, directory, timeouts=timeouts, now=0.0, he_context=he)
            return
        secret = None
        if spec.he_secret is not None:
            secret = ckks.load_secret_context(spec.he_secret, p.he)
        for c in cids:
            ident = IdentityKey(spec.identity_seed(c))
            x = spec.vector(c)
            if p.mode is Mode.CKKS:
                assert secret is not None
                self.clients[c] = CkksClient(
                    c,
                    ident,
                    p,
                    directory,
                    x,
                    1,
                    secret.key_holder(),
                    rounding_key=spec.rounding_key(c),
                )
            else:
                self.clients[c] = SecAggClient(
                    c, ident, p, directory, x, 1,
                    rounding_key=spec.rounding_key(c),
                    he_context=None if secret is None else secret.key_holder(),
                )  # fmt: skip

    # --- clients -------------------------------------------------------------------------

    def start(self, cid: int, now: float) -> tuple[list[bytes], float]:
        t0 = time.perf_counter()
        msgs = [m.encode() for m in self.clients[cid].start(now)]
        return msgs, time.perf_counter() - t0

    def receive(self, cid: int, data: bytes, now: float) -> tuple[list[bytes], float, str | None]:
        from secagg.errors import SecAggError

        t0 = time.perf_counter()
        err = None
        try:
            msgs = [m.encode() for m in self.clients[cid].receive(data, now)]
        except SecAggError as exc:
            msgs, err = [], f"{type(exc).__name__}: {exc}"
        return msgs, time.perf_counter() - t0, err

    def client_done(self, cid: int) -> bool:
        return bool(self.clients[cid].result is not None)

    # --- server --------------------------------------------------------------------------

    def _state(self) -> tuple[bool, float | None, str]:
        s = self.server
        return bool(s.done), s.deadline, str(s.stage.value)

    def server_receive(
        self, cid: int, data: bytes, now: float
    ) -> tuple[list[tuple[int, bytes]], float, tuple[bool, float | None, str]]:
        from secagg.errors import SecAggError

        t0 = time.perf_counter()
        try:
            out = self.server.receive(cid, data, now)
        except SecAggError:
            out = self.server.tick(now)
        return _encode_all(out), time.perf_counter() - t0, self._state()

    def server_tick(
        self, now: float
    ) -> tuple[list[tuple[int, bytes]], float, tuple[bool, float | None, str]]:
        t0 = time.perf_counter()
        enc = _encode_all(self.server.tick(now))
        return enc, time.perf_counter() - t0, self._state()

    def state(self) -> tuple[bool, float | None, str]:
        return self._state()

    def outcome(self, with_result: bool) -> dict[str, Any]:
        res = self.server.result
        if res is None:
            err = self.server.error
            return {
                "status": "aborted",
                "abort": f"{getattr(err, 'stage', '?')}: {getattr(err, 'reason', err)}",
            }
        out: dict[str, Any] = {"status": "completed", "contributors": list(res.contributors)}
        if with_result:
            out["sums"] = res.sums
            out["ciphertexts"] = res.ciphertexts
        return out


def check_exact(spec: RoundSpec, outcome: dict[str, Any]) -> bool:
    """Whether the round's sums are exactly the sum of the contributors' quantized inputs."""
    from secagg import ckks
    from secagg.params import Mode
    from secagg.quantize import lane_values

    p = spec.params
    q = p.quant
    expected = np.zeros(q.values(p.dim), dtype=np.uint64)
    for c in outcome["contributors"]:
        expected += lane_values(spec.vector(c), 1, q, spec.rounding_key(c))
    if p.mode is Mode.MASKED:
        return bool(np.array_equal(outcome["sums"], expected))
    assert spec.he_secret is not None
    sk = ckks.load_secret_context(spec.he_secret, p.he)
    slots = ckks.decrypt(sk, outcome["ciphertexts"])
    if p.mode is Mode.HYBRID:
        slots = ckks.unmask_sum(slots, p.he)
    return bool(np.array_equal(ckks.unpack_lanes(slots, p.he, p.he.n_values), expected))


@dataclass
class Tally:
    """Seconds and bytes by stage."""

    server: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    client: dict[int, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    up: dict[int, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    down: dict[int, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0


def drive(spec: RoundSpec, server: Any, hosts: dict[int, Any]) -> Tally:
    """Run the round: ``server`` and each ``hosts[cid]`` are a :class:`Host` or a proxy.

    The loop is ``secagg.simulate.run_round``'s, on bytes.
    """
    from secagg.params import Mode
    from secagg.simulate import withheld_from, withholds

    ckks_mode = spec.params.mode is Mode.CKKS
    tally = Tally()
    plan = spec.plan
    now = 0.0
    done, deadline, _ = server.state()

    def to_server(cid: int, msgs: list[bytes]) -> list[tuple[int, bytes]]:
        nonlocal done, deadline
        out: list[tuple[int, bytes]] = []
        for data in msgs:
            t = msg_type(data)
            if withholds(plan.get(cid), t):
                continue
            tally.up[cid][UP_STAGE[t]] += len(data)
            got, secs, (done, deadline, _) = server.server_receive(cid, data, now)
            tally.server[UP_STAGE[t]] += secs
            out.extend(got)
        return out

    wall0 = time.perf_counter()
    pending: list[tuple[int, bytes]] = []
    for cid in spec.ids:
        msgs, secs = hosts[cid].start(cid, now)
        tally.client[cid]["input" if ckks_mode else "advertise"] += secs
        pending.extend(to_server(cid, msgs))
    while not done or pending:
        if not pending:
            assert deadline is not None
            now = max(now, deadline)
            stage = server.state()[2]
            pending, secs, (done, deadline, _) = server.server_tick(now)
            tally.server[SERVER_STAGE.get(stage, "result")] += secs
            continue
        batch, pending = pending, []
        for cid, data in batch:
            t = msg_type(data)
            if withheld_from(plan.get(cid), t):
                continue
            tally.down[cid][DOWN_STAGE.get(t, "result")] += len(data)
            replies, secs, err = hosts[cid].receive(cid, data, now)
            tally.client[cid][WORK_STAGE.get(t, "result")] += secs
            if err:
                tally.errors.append(err)
            pending.extend(to_server(cid, replies))
    tally.wall = time.perf_counter() - wall0
    return tally


def summarize(spec: RoundSpec, tally: Tally) -> dict[str, Any]:
    """Per-stage server seconds, client median seconds and mean bytes (senders only)."""
    senders = [c for c in spec.ids if c not in spec.plan] or list(spec.ids)
    stages: dict[str, dict[str, float]] = {}
    for s in STAGES:
        stages[s] = {
            "server_s": tally.server.get(s, 0.0),
            "client_median_s": statistics.median(tally.client[c].get(s, 0.0) for c in senders),
            "upload_B": statistics.mean(tally.up[c].get(s, 0) for c in senders),
            "download_B": statistics.mean(tally.down[c].get(s, 0) for c in senders),
        }
    return {
        "stages": stages,
        "wall_s": tally.wall,
        "server_s": sum(tally.server.values()),
        "client_median_s": statistics.median(sum(tally.client[c].values()) for c in senders),
        "upload_B": statistics.mean(sum(tally.up[c].values()) for c in senders),
        "download_B": statistics.mean(sum(tally.down[c].values()) for c in senders),
        "client_errors": sorted(set(tally.errors))[:5],
    }


def staged_round(cfg: Any, *, check: bool = True) -> dict[str, Any]:
    """One in-process round of ``cfg`` (a ``SimulationConfig``), timed per stage."""
    spec = make_spec(cfg)
    server = Host(spec, "server")
    clients = Host(spec, "clients", spec.ids)
    tally = drive(spec, server, {c: clients for c in spec.ids})
    out = summarize(spec, tally)
    res = server.outcome(with_result=check)
    out["status"] = res["status"]
    out["abort"] = res.get("abort")
    out["survivors"] = len(res.get("contributors", []))
    out["exact"] = check_exact(spec, res) if check and res["status"] == "completed" else None
    out["neighbors"] = spec.params.degree
    out["threshold"] = spec.params.threshold
    return out


# --- process-separated rounds (peak memory) ---------------------------------------------------


def _maxrss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` size in KiB (``VmRSS``, ``VmHWM``); 0 where it is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_kib(reset: bool) -> int:
    """The peak resident set since the reset: ``VmHWM``, the address space's high-water mark.

    Not ``ru_maxrss`` alone: for a process started by fork + exec (``spawn``) the kernel folds
    the forked copy's size, i.e. the parent's, into ``ru_maxrss`` at exec, and the reset does
    not clear that (every role then reports the parent's size).
    """
    hwm = _status_kib("VmHWM") if reset else 0
    return hwm or _maxrss_kib()


def _reset_peak() -> bool:
    """Reset the high-water mark that ``ru_maxrss`` reports (Linux >= 4.0: ``clear_refs`` 5).

    Without it the peak would include whatever the imports touched transiently (and, in a
    process started by fork+exec, the parent's size at the fork).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm() -> None:
    """Import everything and load the Numba CPU kernels (from their on-disk cache), so that
    the baseline taken afterwards holds the interpreter, the libraries and the JIT code."""
    import secagg.client
    import secagg.he_round
    import secagg.server  # noqa: F401
    from secagg import kernels
    from secagg.quantize import QuantSpec

    spec = QuantSpec(clip=1.0, bits=16, n_clients=4)
    acc = kernels.mask_vector(np.zeros(1024), 1, spec, b"\x01" * 32, [])
    kernels.add_masks(acc, [])
    kernels.unpack(acc, spec, 1024)


def _worker(conn: Any, spec: RoundSpec, role: str, cids: tuple[int, ...]) -> None:
    import gc

    _warm()
    gc.collect()
    reset = _reset_peak()
    base = _status_kib("VmRSS") if reset else _maxrss_kib()
    host = Host(spec, role, cids)
    conn.send(("ready", base, reset))
    while True:
        method, args = conn.recv()
        if method == "stop":
            conn.send(_peak_kib(reset))
            return
        try:
            conn.send(("ok", getattr(host, method)(*args)))
        except Exception as exc:  # report, do not hang the parent
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Proxy:
    def __init__(self, ctx: Any, spec: RoundSpec, role: str, cids: tuple[int, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, spec, role, cids), daemon=True)
        self.proc.start()
        child.close()
        self.baseline_kib = 0
        self.reset = False

    def ready(self) -> None:
        tag, self.baseline_kib, self.reset = self.conn.recv()
        assert tag == "ready"

    def _call(self, method: str, *args: Any) -> Any:
        self.conn.send((method, args))
        tag, value = self.conn.recv()
        if tag != "ok":
            raise RuntimeError(f"worker {method}: {value}")
        return value

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self._call(name, *args)

    def stop(self) -> int:
        self.conn.send(("stop", ()))
        peak = int(self.conn.recv())
        self.proc.join(30)
        return peak


def memory_round(cfg: Any) -> dict[str, Any]:
    """Run ``cfg`` with the server, one probe client and the other clients in three processes;
    return each role's peak RSS (MiB), its baseline after imports, and the round's outcome."""
    spec = make_spec(cfg)
    probe = next(c for c in spec.ids if c not in spec.plan)
    ctx = multiprocessing.get_context("spawn")
    server = _Proxy(ctx, spec, "server", ())
    one = _Proxy(ctx, spec, "clients", (probe,))
    others_ids = tuple(c for c in spec.ids if c != probe)
    others = _Proxy(ctx, spec, "clients", others_ids)
    procs = (server, one, others)
    try:
        for p in procs:
            p.ready()
        hosts: dict[int, Any] = {c: others for c in others_ids}
        hosts[probe] = one
        tally = drive(spec, server, hosts)
        outcome = server.outcome(False)
        probe_done = one.client_done(probe)
        peaks = [p.stop() for p in procs]
    finally:
        for p in procs:
            if p.proc.is_alive():
                p.proc.kill()
    mib = 1 / 1024
    summary = summarize(spec, tally)
    return {
        "status": outcome["status"],
        "abort": outcome.get("abort"),
        "probe_completed": probe_done,
        "wall_s": summary["wall_s"],
        "server_peak_MiB": peaks[0] * mib,
        "server_baseline_MiB": server.baseline_kib * mib,
        "client_peak_MiB": peaks[1] * mib,
        "client_baseline_MiB": one.baseline_kib * mib,
        "others_peak_MiB": peaks[2] * mib,
        "peak_reset": all(p.reset for p in procs),
        "input_MiB": spec.params.dim * 8 / 2**20,
        "packed_MiB": spec.params.words * 8 / 2**20,
        "neighbors": spec.params.degree,
        "threshold": spec.params.threshold,
    }
