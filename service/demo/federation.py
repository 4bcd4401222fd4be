"""The demo's deployment, started the way an operator starts one.

1. ``secagg provision`` turns a federation file into startup kits (:mod:`.kits`);
2. ``secagg serve --config server.toml`` runs in the server kit, as a separate process;
3. one process per site builds its client from its own kit (:mod:`.site`);
4. the coordinator (this process) is the operator: its admin client comes from the
   operator kit, and it runs each training run as a job (one round per training round).

The coordinator never sees a site's update. It evaluates the model the sites report after
each round (they all apply the same aggregate, so they must agree bit for bit) and hands
that model to a site that went silent in a round (it has no aggregate to apply).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from secagg.errors import SecAggError
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.coordinator import RoundSpec
from secagg.service.demo import ipc
from secagg.service.demo.data import Split
from secagg.service.demo.kits import CkksKey, Kits, provision_federation, secagg_command
from secagg.service.demo.model import State, TrainConfig, accuracy, build, set_state
from secagg.service.demo.site import SiteSetup, SiteTask, site_main, states_equal

__all__ = ["Deployment", "ModeRun", "RoundRecord", "Task", "server_jobs_available"]

SERVE_TIMEOUT = 60.0
"""Seconds to wait for ``secagg serve`` to listen and for a site to answer."""
HE_MODES = ("ckks", "hybrid")


def server_jobs_available() -> bool:
    """Whether this secagg has the jobs API (``AdminClient.create_job``, ``Client.rounds``)."""
    from secagg.service.client import Client

    return hasattr(AdminClient, "create_job") and hasattr(Client, "rounds")


@dataclass(frozen=True)
class Task:
    """One training task of the demo: a data set split over the sites and a model."""

    name: str
    split: Split
    train: TrainConfig
    modes: tuple[str, ...]
    dim: int
    bits: int

    @property
    def max_weight(self) -> int:
        return max(len(y) for _, y in self.split.sites)

    def key_name(self, mode: str) -> str:
        return f"{self.name}-{mode}"


@dataclass
class RoundRecord:
    """One secure round as the coordinator saw it."""

    round: int
    round_id: str
    accuracy: float
    seconds: float
    site_seconds: float
    dropped_site: str | None
    contributors: list[str]
    dropouts: list[dict[str, str]]
    bytes_up: float
    bytes_down: float
    train_seconds: float = 0.0
    """Median local training time of a site (the same work plaintext FedAvg does)."""


@dataclass
class ModeRun:
    """A whole secure training run in one mode (or why it could not run)."""

    mode: str
    available: bool
    reason: str = ""
    rounds: list[RoundRecord] = field(default_factory=list)
    final_state: State | None = None
    job: str = ""
    job_path: str = ""
    """``"server"`` (a job the server runs) or ``"operator"`` (one round created at a time)."""

    @property
    def accuracy(self) -> list[float]:
        return [r.accuracy for r in self.rounds]


class Deployment:
    """Provisions the federation, starts the server and the sites; a context manager that
    stops them all."""

    def __init__(
        self,
        out: Path,
        tasks: Sequence[Task],
        seed: int,
        sites: int,
        *,
        log: Callable[[str], None],
        server_jobs: bool | None = None,
        disconnect_grace: float = 1.0,
    ) -> None:
        self.out = out
        self.tasks = {t.name: t for t in tasks}
        self.seed = seed
        self.log = log
        self.names = [f"site-{i + 1}" for i in range(sites)]
        self.server_jobs = server_jobs_available() if server_jobs is None else server_jobs
        self.disconnect_grace = disconnect_grace
        self._server: subprocess.Popen[bytes] | None = None
        self._sites: list[tuple[BaseProcess, Connection]] = []
        self.admin: AdminClient | None = None
        self.target = ""
        self.kits: Kits | None = None
        self._ready = False

    @property
    def store_path(self) -> Path:
        return self.out / "kits" / "server" / "secagg.db"

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Provision, start the server and launch the sites (see :meth:`wait_ready`)."""
        kits_dir = self.out / "kits"
        if kits_dir.exists():  # a previous run's federation: provisioning never overwrites
            shutil.rmtree(kits_dir)
        modes = [m for t in self.tasks.values() for m in t.modes]
        keys = [
            CkksKey(t.key_name(m), m, t.dim, t.max_weight, t.bits)
            for t in self.tasks.values()
            for m in t.modes
            if m in HE_MODES
        ]
        t0 = time.perf_counter()
        self.kits = provision_federation(self.out, self.names, modes, keys)
        self.log(
            f"secagg provision {self.kits.federation_file} --out {self.kits.root}: "
            f"{len(self.names)} site kits, 1 operator kit, {len(keys)} CKKS key(s) "
            f"({time.perf_counter() - t0:.1f}s)"
        )
        self._start_server(self.kits)
        self.admin = AdminClient.from_kit(self.kits.operator, target=self.target)
        ctx = multiprocessing.get_context("spawn")  # never fork a process with gRPC threads
        for i, name in enumerate(self.names):
            setup = SiteSetup(
                index=i,
                name=name,
                kit=str(self.kits.sites[name]),
                target=self.target,
                tasks={
                    t.name: SiteTask(
                        x=t.split.sites[i][0],
                        y=t.split.sites[i][1],
                        n_features=t.split.n_features,
                        n_classes=t.split.n_classes,
                        train=t.train,
                    )
                    for t in self.tasks.values()
                },
                seed=self.seed,
            )
            parent, child = ctx.Pipe()
            # Only the pipe crosses to the child at spawn; the setup follows as bytes.
            proc = ctx.Process(target=site_main, args=(child,), name=name, daemon=True)
            proc.start()
            child.close()
            ipc.send(parent, setup.to_message())
            self._sites.append((proc, parent))
        self._ready = False

    def wait_ready(self) -> None:
        """Wait for every site to have started (imports, its kit checked). :meth:`start`
        does not wait, so the coordinator can work meanwhile (the demo's baselines)."""
        if self._ready:
            return
        for site, conn in self._sites:
            self._recv(site, conn)
        self._ready = True
        self.log(
            f"{len(self._sites)} site processes ready (each with Client.from_kit); "
            f"jobs: {'run by the server' if self.server_jobs else 'one round created at a time'}"
        )

    def _start_server(self, kits: Kits) -> None:
        """``secagg serve --kit kits/server`` (the kit's listen address; JSON log to
        ``out/server.log``)."""
        log_path = self.out / "server.log"
        args = ["serve", "--kit", str(kits.server), "--log-format", "json"]
        with open(log_path, "wb") as log_file:
            self._server = subprocess.Popen(  # noqa: S603 -- our own interpreter and CLI
                [
                    *secagg_command(*args),
                    "--shutdown-grace",
                    "2",
                    # a site whose stream closed is dropped after this, not at the deadline
                    "--disconnect-grace",
                    str(self.disconnect_grace),
                ],
                env={k: v for k, v in os.environ.items() if k != "SECAGG_ADMIN_TOKEN"},
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        port = self._wait_for_port(log_path)
        self.target = f"localhost:{port}"
        self.log(
            f"secagg {' '.join(args)}: listening on {self.target} "
            f"(mutual TLS), store {self.store_path}"
        )

    def _wait_for_port(self, log_path: Path) -> int:
        deadline = time.monotonic() + SERVE_TIMEOUT
        while time.monotonic() < deadline:
            assert self._server is not None
            if self._server.poll() is not None:
                raise SecAggError(f"secagg serve exited: see {log_path}")
            for line in log_path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("msg") == "serving" and rec.get("port"):
                    return int(rec["port"])
            time.sleep(0.05)
        raise SecAggError(f"secagg serve did not start listening: see {log_path}")

    def _recv(self, proc: BaseProcess, conn: Connection) -> dict[str, Any]:
        deadline = time.monotonic() + SERVE_TIMEOUT * 4
        while not conn.poll(0.1):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise SecAggError(f"{proc.name} stopped answering (exit code {proc.exitcode})")
        reply: dict[str, Any] = ipc.recv(conn)
        if reply.get("status") == "crashed":
            raise SecAggError(f"{proc.name} crashed: {reply.get('error')}")
        return reply

    def stop(self) -> None:
        """Stop the sites, then the server (SIGTERM: it records running rounds as aborted)."""
        for _, conn in self._sites:
            with contextlib.suppress(OSError):  # a site that already exited
                ipc.send(conn, None)
        for proc, conn in self._sites:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            conn.close()
        self._sites = []
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        if self._server is not None:
            self._server.send_signal(signal.SIGTERM)
            try:
                self._server.wait(15)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
            self._server = None

    # -- jobs ------------------------------------------------------------------------------

    def _spec(self, task: Task, mode: str, base: Mapping[str, Any]) -> dict[str, Any]:
        spec = {**base}
        if mode in HE_MODES:
            assert self.kits is not None
            spec["he_context"] = self.kits.server_context(task.key_name(mode))
        return spec

    def _he_secret(self, task: Task, mode: str, site: str) -> str | None:
        """The site kit's CKKS secret for this (task, mode); ``None`` for the kit's own
        ``ckks.ckks-secret``, which :meth:`Client.from_kit` opens by itself."""
        if mode not in HE_MODES:
            return None
        assert self.kits is not None
        key = task.key_name(mode)
        return None if next(iter(self.kits.keys)) == key else str(self.kits.secret(site, key))

    def _job(
        self,
        task: Task,
        mode: str,
        job: str,
        spec: Mapping[str, Any],
        rounds: int,
        drops: Mapping[int, int],
        *,
        warmup: bool = False,
    ) -> Iterator[tuple[str, list[dict[str, Any]], Any]]:
        """Run one job: tell the sites to follow it, yield each round's (id, the sites'
        reports, final status). The caller sends a silent site the model (:meth:`catch_up`)
        before the next round."""
        admin = self.admin
        assert admin is not None
        server_job = self.server_jobs and not warmup
        if server_job:  # the job exists before any site asks for its rounds
            from secagg.service.coordinator import JobSpec

            admin.create_job(
                JobSpec(
                    name=job,
                    participants=self.names,
                    dim=task.dim,
                    mode=mode,
                    rounds=rounds,
                    **spec,
                )
            )
        for i, (_, conn) in enumerate(self._sites):
            ipc.send(
                conn,
                {
                    "task": task.name,
                    "job": job,
                    "mode": mode,
                    "dim": task.dim,
                    "warmup": warmup,
                    "server_job": server_job,
                    "he_secret": self._he_secret(task, mode, self.names[i]),
                    "drop_rounds": [r for r, s in drops.items() if s == i],
                },
            )
        if server_job:
            yield from self._server_job(job, rounds)
            return
        try:
            for _ in range(rounds):
                status = admin.create_round(
                    RoundSpec(job=job, participants=self.names, dim=task.dim, mode=mode, **spec)
                )
                rid = bytes(status.round_id).hex()
                for _, conn in self._sites:
                    ipc.send(conn, {"round_id": rid})
                yield self._collect(rid)
        finally:
            for _, conn in self._sites:
                with contextlib.suppress(OSError):
                    ipc.send(conn, {"end": True})

    def _server_job(self, job: str, rounds: int) -> Iterator[tuple[str, list[dict[str, Any]], Any]]:
        """The jobs API: the server opens the rounds; the sites follow ``Client.rounds``."""
        admin = self.admin
        assert admin is not None
        try:
            for _ in range(rounds):
                replies = [self._recv(p, c) for p, c in self._sites]
                rid = str(replies[0]["round_id"])
                if any(str(r["round_id"]) != rid for r in replies):
                    raise SecAggError(f"{job}: the sites followed different rounds")
                yield rid, replies, self._final(rid)
            status = admin.wait_job(job, timeout=60.0)
        except Exception:
            self.abort_job(job)
            raise
        if status.status != "finished":
            raise SecAggError(f"job {job} ended {status.status}: {status.reason}")

    def abort_job(self, job: str) -> None:
        """Abort a server-run job the coordinator gives up on (the sites then stop)."""
        if self.admin is not None and self.server_jobs:
            with contextlib.suppress(SecAggError):
                self.admin.abort_job(job, "the demo's coordinator stopped")

    def _collect(self, rid: str) -> tuple[str, list[dict[str, Any]], Any]:
        replies = [self._recv(p, c) for p, c in self._sites]
        return rid, replies, self._final(rid)

    def _final(self, rid: str) -> Any:
        admin = self.admin
        assert admin is not None
        final = admin.wait(bytes.fromhex(rid), timeout=120.0)
        if final.status == "running":
            admin.abort(bytes.fromhex(rid), "the sites gave up on the round")
            final = admin.wait(bytes.fromhex(rid), timeout=10.0)
        return final

    def catch_up(self, replies: Sequence[dict[str, Any]], state: State) -> None:
        """Hand the global model to every site that went silent in the round."""
        for (_, conn), rep in zip(self._sites, replies, strict=True):
            if rep["status"] == "dropped":
                ipc.send(conn, {"state": state})

    def probe(self, task: Task, mode: str, spec: Mapping[str, Any]) -> str | None:
        """A warm-up round of zeros with long deadlines: compiles what the first round of a
        mode compiles (Numba kernels, CKKS contexts) and tells whether the mode is served.
        Returns why not, or ``None``."""
        slow = {**spec, "deadlines": StageTimeouts.uniform(60.0)}
        job = f"{task.name}-{mode}-warmup"
        try:
            for _, replies, final in self._job(task, mode, job, slow, 1, {}, warmup=True):
                refused = sorted({str(r["error"]) for r in replies if r["status"] == "error"})
                if refused and all(e.startswith("PolicyRefused") for e in refused):
                    return f"client SDK: {'; '.join(refused)}"
                if refused or final.status != "completed":
                    raise SecAggError(
                        f"{mode} warm-up round {final.status}: "
                        f"{'; '.join(refused) or final.abort_reason}"
                    )
        except SecAggError as exc:
            if "warm-up round" in str(exc):
                raise
            return f"server: {exc}"
        return None

    def run_mode(
        self,
        task_name: str,
        mode: str,
        rounds: int,
        initial: State,
        dropped: Mapping[int, int],
        base_spec: Mapping[str, Any],
        on_round: Callable[[int, float], None] | None = None,
    ) -> ModeRun:
        """Train ``rounds`` secure rounds of a task in ``mode`` as one job, after a warm-up
        round; a mode the server or the SDK refuses is reported as not available."""
        self.wait_ready()
        task = self.tasks[task_name]
        spec = self._spec(task, mode, base_spec)
        reason = self.probe(task, mode, spec)
        if reason is not None:
            return ModeRun(mode, False, reason)
        model = build(task.split.n_features, task.split.n_classes, task.train, self.seed)
        state = initial
        job = f"{task.name}-{mode}"
        run = ModeRun(
            mode,
            available=True,
            job=job,
            job_path="server" if self.server_jobs else "operator",
        )
        try:
            self._train(task, mode, job, spec, rounds, dropped, run, model, state, on_round)
        except Exception:
            self.abort_job(job)
            raise
        return run

    def _train(
        self,
        task: Task,
        mode: str,
        job: str,
        spec: Mapping[str, Any],
        rounds: int,
        dropped: Mapping[int, int],
        run: ModeRun,
        model: Any,
        state: State,
        on_round: Callable[[int, float], None] | None,
    ) -> None:
        t_prev = time.perf_counter()
        feed = self._job(task, mode, job, spec, rounds, dropped)
        for r, (rid, replies, final) in enumerate(feed, start=1):
            drop = dropped.get(r)
            done = [rep for rep in replies if rep["status"] == "ok" and "state" in rep]
            if final.status != "completed" or not done:
                errors = sorted({str(rep.get("error", rep["status"])) for rep in replies})
                raise SecAggError(f"{job} round {r} {final.status}: {final.abort_reason or errors}")
            if not all(states_equal(done[0]["state"], rep["state"]) for rep in done[1:]):
                raise SecAggError(f"{job} round {r}: the sites ended with different models")
            state = done[0]["state"]
            self.catch_up(replies, state)
            seconds = time.perf_counter() - t_prev
            set_state(model, state)
            acc = accuracy(model, task.split.x_test, task.split.y_test)
            names = {e.client_id: e.name for e in final.directory}
            senders = [rep for rep in replies if rep["status"] == "ok"]
            run.rounds.append(
                RoundRecord(
                    round=r,
                    round_id=rid,
                    accuracy=acc,
                    seconds=seconds,
                    site_seconds=_median([rep["seconds"] for rep in senders]),
                    dropped_site=None if drop is None else self.names[drop],
                    contributors=[names.get(c, str(c)) for c in final.contributors],
                    dropouts=[{"name": d.name, "stage": d.stage} for d in final.dropouts],
                    bytes_up=sum(rep["sent"] for rep in senders) / len(senders),
                    bytes_down=sum(rep["received"] for rep in senders) / len(senders),
                    train_seconds=_median([rep["train_seconds"] for rep in senders]),
                )
            )
            if on_round is not None:
                on_round(r, acc)
            t_prev = time.perf_counter()
        run.final_state = state


def _median(xs: Sequence[float]) -> float:
    return sorted(xs)[len(xs) // 2]
