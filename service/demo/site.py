"""One site of the demo: a separate process that trains locally and aggregates over gRPC.

The coordinator sends commands over a pipe; everything the site sends to the secagg server
goes through the client SDK and :class:`~secagg.service.integrations.torch.SecureFedAvg`,
exactly as a site's own training script would.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from secagg.errors import SecAggError
from secagg.keys import IdentityKey
from secagg.messages import EncryptedInput, MaskedInput, Message
from secagg.service.demo import ipc
from secagg.service.demo.baselines import train_seed
from secagg.service.demo.data import FloatArray, IntArray
from secagg.service.demo.model import TrainConfig, build, get_state, set_state, train_local

__all__ = ["SiteSetup", "site_main"]


@dataclass(frozen=True)
class SiteSetup:
    """Everything a site process needs (sent as an :mod:`ipc` message, never pickled)."""

    index: int
    name: str
    target: str
    x: FloatArray
    y: IntArray
    n_features: int
    n_classes: int
    train: TrainConfig
    seed: int

    def to_message(self) -> dict[str, Any]:
        return {
            **{
                f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"
            },
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_message(cls, m: dict[str, Any]) -> SiteSetup:
        return cls(**{**m, "train": TrainConfig(**m["train"])})


def _silent(msg: Message) -> bool:
    """``on_send`` hook of a site that crashes just before sending its input."""
    return not isinstance(msg, MaskedInput | EncryptedInput)


def site_main(conn: Connection) -> None:
    """Receive the setup, then serve the coordinator's commands until it sends ``None``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    setup = SiteSetup.from_message(ipc.recv(conn))
    from secagg.service.client import Client, Policy
    from secagg.service.integrations.torch import SecureFedAvg
    from secagg.service.tensors import flatten

    model = build(setup.n_features, setup.n_classes, setup.train, setup.seed)
    # torch initializes autograd and the optimizer lazily (seconds on a busy machine): do it
    # now, on a throwaway copy, so that the first round's timing is the round's
    train_local(
        build(setup.n_features, setup.n_classes, setup.train, 0), setup.x, setup.y, setup.train, 0
    )
    identity = IdentityKey()  # generated here: the private key never leaves the site
    client = Client(setup.target, identity, insecure_no_tls=True)  # the demo's loopback server
    fedavg = SecureFedAvg(client, model)
    ipc.send(conn, {"status": "ready", "pid": os.getpid(), "public_key": identity.public})
    try:
        while True:
            cmd: dict[str, Any] | None = ipc.recv(conn)
            if cmd is None:
                return
            client.policy = Policy(
                expected_job=cmd["job"],
                expected_dim=cmd["dim"],
                pinned_directory=cmd["directory"],
                allow_insecure_plaintext=cmd["mode"] == "plaintext",
                # the demo's operator opted into every mode (ckks's trust model is weaker)
                allowed_modes=frozenset({"masked", "hybrid", "ckks"}),
            )
            he = cmd.get("he_secret")  # the key holders' CKKS context (ckks, hybrid)
            warmup = bool(cmd.get("warmup"))
            if not warmup:
                set_state(model, cmd["state"])
                fedavg.sync(model)
                seed = train_seed(setup.seed, cmd["round"], setup.index)
                train_local(model, setup.x, setup.y, setup.train, seed)
            sent0, received0 = client.stats.grpc_sent, client.stats.grpc_received
            t0 = time.perf_counter()
            reply: dict[str, Any]
            try:
                if warmup:
                    client.aggregate(cmd["round_id"], np.zeros(cmd["dim"]), he_context=he)
                    reply = {"status": "ok"}
                elif cmd["drop"]:
                    joined = client.join(cmd["round_id"])
                    vector, _ = flatten(fedavg.update(model))
                    result = client.participate(
                        joined, vector, len(setup.y), on_send=_silent, he_context=he
                    )
                    reply = {"status": "dropped" if result is None else "ok"}
                else:
                    step = fedavg.step(model, len(setup.y), cmd["round_id"], he_context=he)
                    reply = {
                        "status": "ok",
                        "state": get_state(model),
                        "contributors": list(step.contributors),
                    }
            except SecAggError as exc:
                reply = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            except Exception as exc:  # reported to the coordinator, which stops the demo
                reply = {"status": "crashed", "error": f"{exc!r}\n{traceback.format_exc()}"}
            reply.update(
                seconds=time.perf_counter() - t0,
                sent=client.stats.grpc_sent - sent0,
                received=client.stats.grpc_received - received0,
            )
            ipc.send(conn, reply)
    finally:
        client.close()


def states_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two broadcast states are bit-identical."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
