"""The demo's deployment: a ``secagg serve`` process, N site processes, and the coordinator.

The coordinator (this process) plays the operator: it enrols the sites, creates one secagg
round per training round with the admin API, broadcasts the global model, and evaluates the
model the sites agree on. It never sees a site's update.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from secagg import ckks
from secagg.errors import SecAggError
from secagg.params import make_params
from secagg.server import StageTimeouts
from secagg.service.admin import AdminClient
from secagg.service.coordinator import RoundSpec
from secagg.service.demo import ipc
from secagg.service.demo.data import Split
from secagg.service.demo.model import State, TrainConfig, accuracy, build, set_state
from secagg.service.demo.site import SiteSetup, site_main, states_equal

__all__ = ["Deployment", "ModeRun", "RoundRecord"]

SERVE_TIMEOUT = 60.0
"""Seconds to wait for ``secagg serve`` to listen and for a site to answer."""


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


@dataclass
class ModeRun:
    """A whole secure training run in one mode (or why it could not run)."""

    mode: str
    available: bool
    reason: str = ""
    rounds: list[RoundRecord] = field(default_factory=list)
    final_state: State | None = None

    @property
    def accuracy(self) -> list[float]:
        return [r.accuracy for r in self.rounds]


class Deployment:
    """Starts the server and the sites; a context manager that stops them all."""

    def __init__(
        self, out: Path, split: Split, train: TrainConfig, seed: int, *, log: Callable[[str], None]
    ) -> None:
        self.out = out
        self.split = split
        self.train = train
        self.seed = seed
        self.log = log
        self.store_path = out / "secagg.db"
        self.names = [f"site-{i + 1}" for i in range(len(split.sites))]
        self._token = secrets.token_hex(16)
        self._server: subprocess.Popen[bytes] | None = None
        self._sites: list[tuple[BaseProcess, Connection]] = []
        self.admin: AdminClient | None = None
        self.target = ""
        self.directory: dict[str, bytes] = {}
        self._he_secret: dict[str, bytes] = {}
        """Enrolled public keys, which the sites pin (their trusted directory)."""

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
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.store_path}{suffix}").unlink(missing_ok=True)
        log_path = self.out / "server.log"
        env = {**os.environ, "SECAGG_ADMIN_TOKEN": self._token}
        with open(log_path, "wb") as log_file:
            self._server = subprocess.Popen(  # noqa: S603 -- our own interpreter and CLI
                [
                    sys.executable,
                    "-m",
                    "secagg.service.cli",
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--store",
                    str(self.store_path),
                    "--log-format",
                    "json",
                    "--shutdown-grace",
                    "2",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        self.target = f"127.0.0.1:{self._wait_for_port(log_path)}"
        self.log(f"secagg serve listening on {self.target}, store {self.store_path}")
        self.admin = AdminClient(self.target, self._token)
        ctx = multiprocessing.get_context("spawn")  # never fork a process with gRPC threads
        for i, (name, (x, y)) in enumerate(zip(self.names, self.split.sites, strict=True)):
            setup = SiteSetup(
                index=i,
                name=name,
                target=self.target,
                x=x,
                y=y,
                n_features=self.split.n_features,
                n_classes=self.split.n_classes,
                train=self.train,
                seed=self.seed,
            )
            parent, child = ctx.Pipe()
            # Only the pipe crosses to the child at spawn; the setup follows as bytes.
            proc = ctx.Process(target=site_main, args=(child,), name=name, daemon=True)
            proc.start()
            child.close()
            ipc.send(parent, setup.to_message())
            self._sites.append((proc, parent))
        for name, (site, conn) in zip(self.names, self._sites, strict=True):
            # the operator enrols each site's public key (out of band in a deployment)
            self.directory[name] = bytes(self._recv(site, conn)["public_key"])
            self.admin.enroll(name, self.directory[name])
        self.log(f"{len(self._sites)} site processes ready")

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

    def _round(
        self, mode: str, dim: int, spec: Mapping[str, Any], command: Mapping[str, Any]
    ) -> tuple[bytes, list[dict[str, Any]], Any, float]:
        """Create one round, send every site ``command`` for it, collect the replies."""
        admin = self.admin
        assert admin is not None
        t0 = time.perf_counter()
        job = f"demo-{mode}"
        status = admin.create_round(
            RoundSpec(job=job, participants=self.names, dim=dim, mode=mode, **spec)
        )
        rid = bytes(status.round_id)
        base = {
            "job": job,
            "dim": dim,
            "mode": mode,
            "round_id": rid,
            "directory": self.directory,
            "he_secret": self._he_secret.get(mode),
        }
        for i, (_, conn) in enumerate(self._sites):
            ipc.send(conn, {**base, **command, "drop": command.get("drop") == i})
        replies = [self._recv(p, c) for p, c in self._sites]
        final = admin.wait(rid, timeout=120.0)
        if final.status == "running":
            admin.abort(rid, "the sites gave up on the round")
            final = admin.wait(rid, timeout=10.0)
        return rid, replies, final, time.perf_counter() - t0

    def probe(self, mode: str, dim: int, spec: Mapping[str, Any]) -> str | None:
        """A warm-up round of zeros with long deadlines: compiles what the first round of a
        mode compiles (Numba kernels, CKKS contexts) and tells whether the mode is served.
        Returns why not, or ``None``."""
        slow = {**spec, "deadlines": StageTimeouts.uniform(60.0)}
        try:
            _, replies, final, _ = self._round(mode, dim, slow, {"warmup": True})
        except SecAggError as exc:
            return f"server: {exc}"
        refused = sorted({str(r["error"]) for r in replies if r["status"] == "error"})
        if refused and all(e.startswith("PolicyRefused") for e in refused):
            return f"client SDK: {'; '.join(refused)}"
        if refused or final.status != "completed":
            raise SecAggError(
                f"{mode} warm-up round {final.status}: {'; '.join(refused) or final.abort_reason}"
            )
        return None

    def run_mode(
        self,
        mode: str,
        rounds: int,
        initial: State,
        dropped: Mapping[int, int],
        spec: Mapping[str, Any],
        on_round: Callable[[int, float], None] | None = None,
    ) -> ModeRun:
        """Train ``rounds`` secure rounds in ``mode`` after a warm-up round; a mode the
        server or the SDK refuses is reported as not available (not raised)."""
        dim = sum(int(v.size) for v in initial.values())
        if mode in ("ckks", "hybrid"):
            # One key for the federation, given to every site (out of band in a deployment);
            # the server gets a context with no key of any kind.
            he = make_params(
                len(self.names), dim, mode=mode, bits=spec["bits"], max_weight=spec["max_weight"]
            ).he
            secret = ckks.make_secret_context(he)
            self._he_secret[mode] = secret
            spec = {**spec, "he_context": ckks.make_public_context(secret)}
        reason = self.probe(mode, dim, spec)
        if reason is not None:
            return ModeRun(mode, False, reason)
        model = build(self.split.n_features, self.split.n_classes, self.train, self.seed)
        state = initial
        run = ModeRun(mode, available=True)
        for r in range(1, rounds + 1):
            drop = dropped.get(r)
            rid, replies, final, seconds = self._round(
                mode, dim, spec, {"round": r, "state": state, "drop": drop}
            )
            done = [rep for rep in replies if rep["status"] == "ok" and "state" in rep]
            if final.status != "completed" or not done:
                errors = sorted({str(rep.get("error", rep["status"])) for rep in replies})
                raise SecAggError(
                    f"{mode} round {r} {final.status}: {final.abort_reason or errors}"
                )
            if not all(states_equal(done[0]["state"], rep["state"]) for rep in done[1:]):
                raise SecAggError(f"{mode} round {r}: the sites ended with different models")
            state = done[0]["state"]
            set_state(model, state)
            acc = accuracy(model, self.split.x_test, self.split.y_test)
            names = {e.client_id: e.name for e in final.directory}
            senders = [rep for rep in replies if rep["status"] == "ok"]
            run.rounds.append(
                RoundRecord(
                    round=r,
                    round_id=rid.hex(),
                    accuracy=acc,
                    seconds=seconds,
                    site_seconds=sorted(rep["seconds"] for rep in senders)[len(senders) // 2],
                    dropped_site=None if drop is None else self.names[drop],
                    contributors=[names.get(c, str(c)) for c in final.contributors],
                    dropouts=[{"name": d.name, "stage": d.stage} for d in final.dropouts],
                    bytes_up=sum(rep["sent"] for rep in senders) / len(senders),
                    bytes_down=sum(rep["received"] for rep in senders) / len(senders),
                )
            )
            if on_round is not None:
                on_round(r, acc)
        run.final_state = state
        return run
