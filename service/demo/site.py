"""One site of the demo: a separate process that trains locally and aggregates over gRPC.

The site builds its client from its startup kit (:meth:`Client.from_kit`: mutual TLS, the
federation authority, the kit's policy, and for ckks and hybrid rounds the CKKS secret
context in the kit). For each job it runs the loop a site's own training script runs::

    for round_id in rounds(job):        # each round id as the round opens
        train locally
        fedavg.step(model, n_samples, round_id)   # the aggregate, applied locally

Every site gets the same aggregate, so each keeps the global model itself; nobody
broadcasts it. The coordinator only tells a site which job to follow (the operator's
instructions, out of band), receives what the site chooses to report for the demo's table
and checks (its model after the round, timings and byte counts), and hands the current
model to a site that missed a round (it went silent: it has no aggregate to apply).
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from secagg.errors import SecAggError
from secagg.messages import EncryptedInput, MaskedInput, Message
from secagg.service.demo import ipc
from secagg.service.demo.baselines import train_seed
from secagg.service.demo.model import TrainConfig, build, get_state, set_state, train_local

__all__ = ["SiteSetup", "SiteTask", "site_main", "states_equal"]


@dataclass(frozen=True)
class SiteTask:
    """One training task's share of a site: its data and how it trains."""

    x: Any
    y: Any
    n_features: int
    n_classes: int
    train: TrainConfig

    def to_message(self) -> dict[str, Any]:
        return {
            "x": self.x,
            "y": self.y,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> SiteTask:
        return cls(**{**m, "train": TrainConfig(**m["train"])})


@dataclass(frozen=True)
class SiteSetup:
    """Everything a site process needs (sent as an :mod:`ipc` message, never pickled)."""

    index: int
    name: str
    kit: str
    """The site's startup kit (``secagg provision``)."""
    target: str
    """The server's address as the coordinator found it listening (the kit's, normally)."""
    tasks: dict[str, SiteTask]
    seed: int

    def to_message(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kit": self.kit,
            "target": self.target,
            "tasks": {k: t.to_message() for k, t in self.tasks.items()},
            "seed": self.seed,
        }

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> SiteSetup:
        tasks = {k: SiteTask.from_message(t) for k, t in m["tasks"].items()}
        return cls(**{**m, "tasks": tasks})


class _Stop(Exception):
    """The coordinator told the site to exit."""


def _silent(msg: Message) -> bool:
    """``on_send`` hook of a site that crashes just before sending its input."""
    return not isinstance(msg, MaskedInput | EncryptedInput)


def _command(conn: Connection) -> dict[str, Any]:
    cmd: dict[str, Any] | None = ipc.recv(conn)
    if cmd is None:
        raise _Stop
    return cmd


def round_ids(client: Any, job: dict[str, Any], conn: Connection) -> Iterator[str]:
    """The ids (hex) of the job's rounds as they open.

    With the jobs API the server opens them (``client.rounds(job)``); until then the operator
    creates each round and the coordinator relays its id over the control pipe.
    """
    if job.get("server_job"):
        yield from client.rounds(job["job"])
        return
    while True:
        msg = _command(conn)
        if msg.get("end"):
            return
        yield str(msg["round_id"])


def site_main(conn: Connection) -> None:
    """Receive the setup, then follow the coordinator's jobs until it sends ``None``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    setup = SiteSetup.from_message(ipc.recv(conn))
    from secagg.service.client import Client

    # torch initializes autograd and the optimizer lazily (seconds on a busy machine): do it
    # now, on throwaway copies, so that the first round's timing is the round's
    for task in setup.tasks.values():
        small = slice(0, min(8, len(task.y)))
        train_local(
            build(task.n_features, task.n_classes, task.train, 0),
            task.x[small],
            task.y[small],
            dataclasses.replace(task.train, epochs=1),
            0,
        )
    # one check that the kit works before the first job (mTLS, identity, authority)
    Client.from_kit(setup.kit, target=setup.target).close()
    ipc.send(conn, {"status": "ready", "pid": os.getpid()})
    try:
        while True:
            _run_job(setup, conn, _command(conn))
    except _Stop:
        return


def _run_job(setup: SiteSetup, conn: Connection, job: dict[str, Any]) -> None:
    """Follow one job: train, aggregate and report each round; catch up after a drop."""
    from secagg.service.client import Client
    from secagg.service.integrations.torch import SecureFedAvg

    task = setup.tasks[job["task"]]
    mode = str(job["mode"])
    he_context = None if job.get("he_secret") is None else Path(job["he_secret"])
    drops = {int(r) for r in job.get("drop_rounds", [])}
    warmup = bool(job.get("warmup"))
    client = Client.from_kit(
        setup.kit,
        target=setup.target,
        expected_job=job["job"],
        expected_dim=int(job["dim"]),
        allow_insecure_plaintext=mode == "plaintext",
    )
    model = build(task.n_features, task.n_classes, task.train, setup.seed)
    fedavg = SecureFedAvg(client, model)
    try:
        for r, round_id in enumerate(round_ids(client, job, conn), start=1):
            t_train = time.perf_counter()
            if not warmup:
                seed = train_seed(setup.seed, r, setup.index)
                train_local(model, task.x, task.y, task.train, seed)
            train_seconds = time.perf_counter() - t_train
            sent0, received0 = client.stats.grpc_sent, client.stats.grpc_received
            t0 = time.perf_counter()
            reply: dict[str, Any] = {"round": r, "round_id": round_id}
            try:
                if warmup:
                    client.aggregate(round_id, np.zeros(int(job["dim"])), he_context=he_context)
                    reply["status"] = "ok"
                elif r in drops:
                    from secagg.service.tensors import flatten

                    joined = client.join(round_id)
                    vector, _ = flatten(fedavg.update(model))
                    result = client.participate(
                        joined, vector, len(task.y), on_send=_silent, he_context=he_context
                    )
                    reply["status"] = "dropped" if result is None else "ok"
                else:
                    step = fedavg.step(model, len(task.y), round_id, he_context=he_context)
                    reply.update(
                        status="ok", state=get_state(model), contributors=list(step.contributors)
                    )
            except SecAggError as exc:
                reply.update(status="error", error=f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # reported to the coordinator, which stops the demo
                reply.update(status="crashed", error=f"{exc!r}\n{traceback.format_exc()}")
            reply.update(
                seconds=time.perf_counter() - t0,
                train_seconds=train_seconds,
                sent=client.stats.grpc_sent - sent0,
                received=client.stats.grpc_received - received0,
            )
            ipc.send(conn, reply)
            if reply["status"] == "dropped":  # no aggregate to apply: load the global model
                set_state(model, _command(conn)["state"])
                fedavg.sync(model)
            if reply["status"] in ("error", "crashed") and job.get("server_job"):
                return  # a server-run job continues without us; the coordinator aborts it
    finally:
        client.close()


def states_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two models' states are bit-identical."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
