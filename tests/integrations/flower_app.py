"""The Flower app the integration tests run: real ServerApp, Strategy, ClientApp and mods
on non-IID linear-regression data, and its nodes enrolled on a loopback federation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from secagg.directory import sign_entry
from secagg.server import StageTimeouts
from secagg.service.authority import PUBLIC_FORMAT
from secagg.service.integrations.flower import SecAggMod
from secagg.service.keyfile import write_identity

from .conftest import Federation
from .flower_local import RUN_ID, LocalGrid

NODES = [2**40 + 17 * i for i in range(1, 5)]
ROUNDS = 3
CRASH = (NODES[3], 2)  # node 4 crashes in round 2
DEADLINES = StageTimeouts(
    advertise_keys=3.0, share_keys=10.0, masked_input=3.0, consistency=10.0, unmasking=10.0
)


def site_data(i: int) -> tuple[Any, Any]:
    """Non-IID linear-regression data: each site sees another region of input space."""
    rng = np.random.default_rng(i)
    n = 20 + 15 * i
    x = rng.normal(loc=0.5 * i, size=(n, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3 + 0.05 * rng.normal(size=n)
    return x, y


def client_app(crash: tuple[int, int] | None = CRASH) -> ClientApp:
    data = {nid: site_data(i) for i, nid in enumerate(NODES)}
    secagg = SecAggMod()
    app = ClientApp(mods=[secagg])

    @app.train()  # type: ignore[misc]
    def train(msg: Message, context: Context) -> Message:
        if (context.node_id, msg.content["config"]["server-round"]) == crash:
            raise RuntimeError("site crashed")
        arrays = msg.content["arrays"]
        w = arrays["w"].numpy().astype(np.float64)
        b = arrays["b"].numpy().astype(np.float64)
        x, y = data[context.node_id]
        for _ in range(5):
            err = x @ w + b - y
            w -= 0.05 * x.T @ err / len(y)
            b -= 0.05 * err.mean(keepdims=True)
        out = ArrayRecord({"w": Array(w.astype(np.float32)), "b": Array(b.astype(np.float32))})
        metrics = MetricRecord({"num-examples": len(y), "mse": float(np.mean(err**2))})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    secagg.register(app)
    return app


def run(strategy: Any, grid: LocalGrid, rounds: int = ROUNDS) -> Any:
    initial = ArrayRecord(
        {"w": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(1, np.float32))}
    )
    out: dict[str, Any] = {}
    app = ServerApp()

    @app.main()  # type: ignore[misc]
    def main(grid: Any, context: Context) -> None:
        out["result"] = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)

    app(grid, Context(RUN_ID, 0, {}, RecordDict(), {}))
    return out["result"]


def enroll_nodes(federation: Federation, keys: Path) -> dict[int, dict[str, Any]]:
    """Enrol one identity per node (names ``flower-1``..) and return their node configs
    (authority from the enrolment kit; INSECURE plaintext: the loopback test server)."""
    kit = keys / "authority.pub"  # what each site's enrolment kit carries
    kit.write_text(
        json.dumps(
            {
                "format": PUBLIC_FORMAT,
                "federation": federation.federation,
                "public_key": federation.authority_key.public.hex(),
            }
        )
    )
    configs = {}
    for i, nid in enumerate(NODES, start=1):
        key = write_identity(keys / f"node-{i}.key")
        name = f"flower-{i}"
        entry = sign_entry(federation.authority_key, federation.federation, name, key.public)
        federation.admin.enroll(name, key.public, entry.encode())
        configs[nid] = {
            "secagg-server": federation.server.target,
            "secagg-identity": str(keys / f"node-{i}.key"),
            "secagg-authority": str(kit),
            "secagg-insecure-no-tls": "true",  # loopback test server
        }
    return configs
