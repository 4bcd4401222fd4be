"""``secagg simulate --transport grpc``: a real server and N real clients over loopback.

Same test data, weights and dropout plan as the in-process simulation for the same seed
(:mod:`secagg.simulate`), and the same JSON report, plus ``stage_seconds`` measured by the
server, per-client gRPC bytes and the transport used. Clients run as threads of this
process or spread over worker processes (each hosting a group of client threads).
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc.aio
import numpy as np
import numpy.typing as npt

from secagg import graph
from secagg.client import ClientResult
from secagg.directory import Authority, sign_entry
from secagg.errors import ConfigurationError, SecAggError
from secagg.keys import IdentityKey
from secagg.messages import SEND_ORDER, Message
from secagg.params import Mode, make_params
from secagg.quantize import dequantize, encode, unpack
from secagg.rounds.base import Stage
from secagg.server import PER_CLIENT_SECONDS, StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.aio_client import AsyncClient, aio_channel
from secagg.service.client import Client, Policy, TransferStats
from secagg.service.config import ServerConfig
from secagg.service.coordinator import RoundSpec
from secagg.service.server import BackgroundServer
from secagg.service.store import Store
from secagg.simulate import SimulationConfig, simulation_inputs

__all__ = [
    "PER_DIRECTORY_ENTRY_SECONDS",
    "PER_NEIGHBOUR_SECONDS",
    "WORKERS",
    "ClientJob",
    "default_deadlines",
    "run_async_group",
    "run_client_async",
    "simulate_grpc",
]

FEDERATION = "simulate"
"""Federation name the simulated authority signs directory entries for."""
_SENDS = {
    Stage.ADVERTISE_KEYS: 1,
    Stage.REVEAL_NONCES: 7,
    Stage.SHARE_KEYS: 2,
    Stage.MASKED_INPUT: 3,
    Stage.CONSISTENCY: 4,
    Stage.UNMASKING: 5,
}
"""Type of the message a client sends in each stage (secagg.messages)."""


PER_NEIGHBOUR_SECONDS = 0.01
"""A simulated client's work per neighbour in one stage, generously (X25519, Shamir shares,
AEAD: a few ms on one loaded core): with every client on this machine a stage lasts about
``n * k`` of these divided by the cores."""
PER_DIRECTORY_ENTRY_SECONDS = 0.001
"""A simulated client's work per directory entry when it joins, generously (decoding the
entry and verifying the authority's Ed25519 signature on it: about 0.1 ms on one loaded
core): every client checks all ``n`` entries before it advertises its keys, so with every
client on this machine the joins alone take about ``n * n`` of these divided by the cores
(a 1,000-client round: 1,000,000 signature checks before the first stage can end)."""


def default_deadlines(
    clients: int, dim: int, degree: int | None = None, cores: int | None = None
) -> StageTimeouts:
    """Stage deadlines for a loopback run: short, but long enough for the slowest stage.

    Every client runs on this machine's cores, so a stage takes about ``n`` clients' work
    (``PER_CLIENT_SECONDS`` plus ``PER_NEIGHBOUR_SECONDS`` per neighbour) over the cores, and
    the bulk stages add ``n * dim`` words; the first stage also waits for every client's
    join, which checks the whole directory (``PER_DIRECTORY_ENTRY_SECONDS`` per entry). A
    fixed 10 s share-keys deadline made 200-client runs abort. A silent client costs the
    grace period, not these.
    """
    k = clients - 1 if degree is None else degree
    cpus = cores or os.cpu_count() or 2
    per_client = 10.0 + clients * (PER_CLIENT_SECONDS + PER_NEIGHBOUR_SECONDS * k) / cpus
    bulk = per_client + clients * dim / 2e6
    joins = clients * clients * PER_DIRECTORY_ENTRY_SECONDS / cpus
    return StageTimeouts(
        advertise_keys=30.0 + PER_CLIENT_SECONDS * clients + joins,
        share_keys=per_client,
        masked_input=bulk,
        consistency=per_client,
        unmasking=bulk,
        reveal_nonces=per_client,
    )


@dataclass(frozen=True)
class ClientJob:
    """Everything one simulated client needs (picklable, for worker processes)."""

    target: str
    seed: bytes
    round_id: bytes
    vector: npt.NDArray[np.float64]
    weight: int
    rounding_key: bytes
    drop_at: int | None
    plaintext: bool
    dropout: float | None = None
    """Tolerated fractions the client's policy checks the round with (library defaults
    when ``None``): the same the operator gave the server's parameter finder."""
    corrupt: float | None = None
    authority_key: bytes = b""
    """The simulated federation authority's public key: clients verify the directory."""


@dataclass(frozen=True)
class ClientOutcome:
    completed: bool
    error: str | None
    seconds: float
    protocol_up: int
    protocol_down: int
    grpc_up: int
    grpc_down: int
    sums_sha256: str | None


def _policy(job: ClientJob) -> Policy:
    return Policy(
        allow_insecure_plaintext=job.plaintext,
        min_threshold=1,
        dropout=graph.DEFAULT_DROPOUT if job.dropout is None else job.dropout,
        corrupt=graph.DEFAULT_CORRUPT if job.corrupt is None else job.corrupt,
        authority=Authority(FEDERATION, job.authority_key),
    )


def _silent_at(job: ClientJob) -> Callable[[Message], bool]:
    def on_send(msg: Message) -> bool:
        return job.drop_at is None or SEND_ORDER[job.drop_at] > SEND_ORDER[msg.TYPE]

    return on_send


def _outcome(
    result: ClientResult | None, error: str | None, seconds: float, s: TransferStats
) -> ClientOutcome:
    digest = None
    if result is not None:
        digest = hashlib.sha256(result.sums.astype("<u8").tobytes()).hexdigest()
    return ClientOutcome(
        result is not None,
        error,
        seconds,
        s.protocol_sent,
        s.protocol_received,
        s.grpc_sent,
        s.grpc_received,
        digest,
    )


def run_client(job: ClientJob) -> ClientOutcome:
    """Join, run and report one client (in a thread or a worker process)."""
    t0 = time.perf_counter()
    client = Client(
        job.target,
        IdentityKey(job.seed),
        policy=_policy(job),
        insecure_no_tls=True,  # an in-process loopback simulation
    )
    error = None
    result = None
    try:
        joined = client.join(job.round_id)
        result = client.participate(
            joined, job.vector, job.weight, rounding_key=job.rounding_key, on_send=_silent_at(job)
        )
    except SecAggError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return _outcome(result, error, time.perf_counter() - t0, client.stats)


async def run_client_async(
    job: ClientJob, channel: grpc.aio.Channel, executor: Executor | None = None
) -> ClientOutcome:
    """:func:`run_client` as a coroutine (:class:`secagg.service.aio_client.AsyncClient`).

    ``seconds`` is the client's wall time from join to result, which on a shared event loop
    includes waiting for the loop; :func:`run_async_group` also reports CPU seconds.
    """
    t0 = time.perf_counter()
    client = AsyncClient(
        channel,
        job.target,
        IdentityKey(job.seed),
        policy=_policy(job),
        insecure_no_tls=True,  # an in-process loopback simulation
        executor=executor,
    )
    error = None
    result = None
    try:
        joined = await client.join(job.round_id)
        result = await client.participate(
            joined, job.vector, job.weight, rounding_key=job.rounding_key, on_send=_silent_at(job)
        )
    except SecAggError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return _outcome(result, error, time.perf_counter() - t0, client.stats)


CLIENTS_PER_CHANNEL = 64
"""Clients of one worker process sharing one HTTP/2 connection (``--workers async``)."""
ASYNC_CPU_THREADS = 1
"""Threads that run the protocol cores of one worker process's clients (``--workers
async``): the cores hold the GIL for most of their work, so more threads buy little; the
processes spread the clients over the cores."""


def run_async_group(jobs: list[ClientJob]) -> list[ClientOutcome]:
    """Run ``jobs`` as :class:`AsyncClient` coroutines on one event loop (one process)."""
    return asyncio.run(_async_group(jobs))


async def _async_group(jobs: list[ClientJob]) -> list[ClientOutcome]:
    if not jobs:
        return []
    target = jobs[0].target
    n_channels = -(-len(jobs) // CLIENTS_PER_CHANNEL)
    channels = [aio_channel(target) for _ in range(n_channels)]
    with ThreadPoolExecutor(ASYNC_CPU_THREADS, thread_name_prefix="secagg-client") as pool:
        try:
            return list(
                await asyncio.gather(
                    *(
                        run_client_async(job, channels[i % n_channels], pool)
                        for i, job in enumerate(jobs)
                    )
                )
            )
        finally:
            for ch in channels:
                await ch.close()


def _run_group(jobs: list[ClientJob]) -> list[ClientOutcome]:
    out: list[ClientOutcome | None] = [None] * len(jobs)

    def one(i: int) -> None:
        out[i] = run_client(jobs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for o in out if o is not None]


def _run_processes(
    jobs: list[ClientJob],
    processes: int,
    group: Callable[[list[ClientJob]], list[ClientOutcome]] = _run_group,
) -> list[ClientOutcome]:
    groups = [jobs[i::processes] for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")  # never fork a process running gRPC threads
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        results = list(pool.map(group, groups))
    order: dict[int, ClientOutcome] = {}
    for g, res in zip(range(processes), results, strict=True):
        for k, o in enumerate(res):
            order[g + k * processes] = o
    return [order[i] for i in range(len(jobs))]


class _Progress:
    """One self-rewriting status line on stderr (only on a terminal)."""

    def __init__(self, admin: AdminClient, round_id: bytes, total: int) -> None:
        self._admin, self._rid, self._total = admin, round_id, total
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()

    def _run(self) -> None:
        stages = list(_SENDS)
        while not self._stop.wait(0.2):
            try:
                st = self._admin.status(self._rid)
            except SecAggError:
                continue
            names = [s.value for s in stages]
            done = names.index(st.stage) if st.stage in names else len(stages)
            bar = "#" * done + "." * (len(stages) - done)
            sys.stderr.write(
                f"\r[{bar}] {st.stage:<15} dropped {len(st.dropouts)}/{self._total}  "
                f"{time.monotonic() - self._t0:6.1f}s"
            )
            sys.stderr.flush()


WORKERS = ("threads", "processes", "async")
"""How ``simulate_grpc`` hosts its clients: threads of this process (one per client), worker
processes of client threads, or worker processes each running its clients as coroutines on
one event loop (:mod:`secagg.service.aio_client`; for hundreds of clients)."""


def _runner(
    workers: str, processes: int | None
) -> Callable[[list[ClientJob]], list[ClientOutcome]]:
    if workers not in WORKERS:
        raise ConfigurationError(f"workers={workers!r}: choose one of {', '.join(WORKERS)}")
    if workers == "threads":
        return _run_group
    group = run_async_group if workers == "async" else _run_group

    def run(jobs: list[ClientJob]) -> list[ClientOutcome]:
        return _run_processes(jobs, processes or min(len(jobs), os.cpu_count() or 2), group)

    return run


def simulate_grpc(
    cfg: SimulationConfig,
    *,
    workers: str = "threads",
    processes: int | None = None,
    deadlines: StageTimeouts | None = None,
    plaintext: bool = False,
    progress: bool = False,
    client_runner: Callable[[list[ClientJob]], list[ClientOutcome]] | None = None,
    disconnect_grace: float = 1.0,
    on_round: Callable[[AdminClient, bytes], None] | None = None,
) -> dict[str, Any]:
    """Run the configured round through a loopback gRPC server; return the report.

    A simulated dropout cancels its stream, so it costs ``disconnect_grace`` seconds (short:
    loopback reconnects are immediate), not a stage deadline. ``on_round`` is called with
    the operator's admin client and the round id once the round is created (benchmarks use
    it to follow the stages; the client is closed when the round has ended).
    """
    wall0 = time.perf_counter()
    if Mode.parse(cfg.mode) is not Mode.MASKED:
        raise SecAggError("the gRPC transport runs masked rounds only")
    params = make_params(
        cfg.clients,
        cfg.dim,
        clip=cfg.clip,
        bits=cfg.bits,
        max_weight=cfg.max_weight,
        neighbors=cfg.neighbors,
        threshold=cfg.threshold,
        dropout=cfg.tolerated_dropout,
        corrupt=cfg.tolerated_corrupt,
    )
    ids, inputs, weights, plan = simulation_inputs(cfg)
    seeds = {cid: secrets.token_bytes(32) for cid in ids}
    rounding = {cid: secrets.token_bytes(32) for cid in ids}
    token = secrets.token_hex(16)
    authority = IdentityKey()  # the simulated federation authority signs the directory
    store = Store(":memory:")
    server = BackgroundServer(
        ServerConfig(
            listen="127.0.0.1:0",
            store=":memory:",
            admin_token=token,
            disconnect_grace=disconnect_grace,
        ),
        store=store,
    ).start()
    try:
        with AdminClient(server.target, token) as admin:
            names = [f"client-{cid}" for cid in ids]
            for cid, name in zip(ids, names, strict=True):
                key = IdentityKey(seeds[cid]).public
                admin.enroll(name, key, sign_entry(authority, FEDERATION, name, key).encode())
            spec = RoundSpec(
                job="simulate",
                participants=names,
                dim=cfg.dim,
                mode="plaintext" if plaintext else "masked",
                bits=cfg.bits,
                clip=cfg.clip,
                max_weight=cfg.max_weight,
                neighbors=cfg.neighbors,
                threshold=cfg.threshold,
                deadlines=deadlines or default_deadlines(cfg.clients, cfg.dim, params.degree),
                tolerate_dropout=cfg.tolerated_dropout,
                tolerate_corrupt=cfg.tolerated_corrupt,
            )
            round_id = admin.create_round(spec).round_id
            if on_round is not None:
                on_round(admin, round_id)
            jobs = [
                ClientJob(
                    server.target,
                    seeds[cid],
                    round_id,
                    inputs[cid],
                    weights[cid],
                    rounding[cid],
                    _SENDS[plan[cid]] if cid in plan else None,
                    plaintext,
                    cfg.tolerated_dropout,
                    cfg.tolerated_corrupt,
                    authority.public,
                )
                for cid in ids
            ]
            t_round = time.perf_counter()
            show = progress and sys.stderr.isatty()
            runner = client_runner or _runner(workers, processes)
            if show:
                with _Progress(admin, round_id, cfg.clients):
                    outcomes = runner(jobs)
            else:
                outcomes = runner(jobs)
            round_seconds = time.perf_counter() - t_round
            status = admin.wait(round_id, timeout=60.0)
    finally:
        server.stop()
        store.close()
    wall = time.perf_counter() - wall0
    report: dict[str, Any] = {
        "mode": "plaintext (INSECURE)" if plaintext else params.mode.name.lower(),
        "clients": cfg.clients,
        "dim": cfg.dim,
        "bits": cfg.bits,
        "neighbors": params.degree,
        "threshold": params.threshold,
        "dropped": {str(c): s.value for c, s in sorted(plan.items())},
        "warnings": list(params.warnings),
    }
    if status.status == "completed":
        spec_q = params.quant
        contributors = list(status.contributors)
        expected = np.zeros(spec_q.values(cfg.dim), dtype=np.uint64)
        float_sum = np.zeros(cfg.dim)
        for cid in contributors:
            words = encode(inputs[cid], weights[cid], spec_q, rounding[cid])
            expected += unpack(words, spec_q, spec_q.values(cfg.dim))
            float_sum += weights[cid] * inputs[cid]
        digest = hashlib.sha256(expected.astype("<u8").tobytes()).hexdigest()
        received = {o.sums_sha256 for o in outcomes if o.completed}
        weighted, _total = dequantize(expected, spec_q, len(contributors), cfg.dim)
        report.update(
            status="completed",
            survivors=len(contributors),
            exact=digest == status.aggregate_sha256 and received == {digest},
            max_abs_error=float(np.max(np.abs(weighted - float_sum))),
            quantization_step=1.0 / spec_q.scale,
        )
    else:
        report.update(
            status="aborted",
            abort={"stage": status.abort_stage, "reason": status.abort_reason},
            survivors=0,
            exact=False,
            max_abs_error=None,
        )
    senders = [i for i, c in enumerate(ids) if c not in plan] or list(range(len(ids)))
    report["seconds"] = {
        "client_median": statistics.median(outcomes[i].seconds for i in senders),
        "server": sum(status.stage_seconds.values()),
        "round": round_seconds,
        "wall": wall,
    }
    report["stage_seconds"] = dict(status.stage_seconds)
    report["bytes"] = {
        "upload_per_client": statistics.mean(outcomes[i].protocol_up for i in senders),
        "download_per_client": statistics.mean(outcomes[i].protocol_down for i in senders),
        "raw_float32_per_client": 4 * cfg.dim,
        "grpc_upload_per_client": statistics.mean(outcomes[i].grpc_up for i in senders),
        "grpc_download_per_client": statistics.mean(outcomes[i].grpc_down for i in senders),
    }
    report["transport"] = {"kind": "grpc", "workers": workers, "disconnect_grace": disconnect_grace}
    errors = sorted({o.error for o in outcomes if o.error})
    if errors:
        report["client_errors"] = errors
    return report
