"""A Flower app (real ServerApp, Strategy, ClientApp and mods) aggregating through secagg."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg.directory import sign_entry
from secagg.errors import ConfigurationError
from secagg.server import StageTimeouts
from secagg.service.authority import PUBLIC_FORMAT
from secagg.service.keyfile import write_identity

from .conftest import Federation

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from secagg.service.integrations.flower import (  # noqa: E402
    SECAGG_RECORD,
    SecAggFedAvg,
    SecAggMod,
    strategy_from_run_config,
)

from .flower_local import RUN_ID, LocalGrid  # noqa: E402

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


def client_app() -> ClientApp:
    data = {nid: site_data(i) for i, nid in enumerate(NODES)}
    secagg = SecAggMod()
    app = ClientApp(mods=[secagg])

    @app.train()  # type: ignore[misc]
    def train(msg: Message, context: Context) -> Message:
        if (context.node_id, msg.content["config"]["server-round"]) == CRASH:
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


def run(strategy: Any, grid: LocalGrid) -> Any:
    initial = ArrayRecord(
        {"w": Array(np.zeros(4, np.float32)), "b": Array(np.zeros(1, np.float32))}
    )
    out: dict[str, Any] = {}
    app = ServerApp()

    @app.main()  # type: ignore[misc]
    def main(grid: Any, context: Context) -> None:
        out["result"] = strategy.start(grid=grid, initial_arrays=initial, num_rounds=ROUNDS)

    app(grid, Context(RUN_ID, 0, {}, RecordDict(), {}))
    return out["result"]


@pytest.fixture(scope="module")
def node_configs(
    federation: Federation, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, dict[str, Any]]:
    keys: Path = tmp_path_factory.mktemp("keys")
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


def test_flower_app_aggregates_through_secagg(
    federation: Federation, node_configs: dict[int, dict[str, Any]]
) -> None:
    plain_grid = LocalGrid(client_app(), node_configs)
    plain = run(FedAvg(fraction_evaluate=0.0, min_available_nodes=4), plain_grid)

    grid = LocalGrid(client_app(), node_configs)
    strategy = SecAggFedAvg(
        federation.admin,
        job="flower-test",
        clip=1.0,
        max_weight=1000,
        deadlines=DEADLINES,
        fraction_evaluate=0.0,
        min_available_nodes=4,
    )
    secure = run(strategy, grid)

    # the same model as Flower's own FedAvg, up to 16-bit quantization of the deltas
    for key in ("w", "b"):
        diff = np.abs(secure.arrays[key].numpy() - plain.arrays[key].numpy()).max()
        assert diff < ROUNDS * 2.0 / 65535 + 1e-5, (key, diff)
    assert not np.allclose(plain.arrays["w"].numpy(), 0.0)

    # every Flower round ran one secagg round; node 4's crash shows as a dropout
    assert [r.status for r in strategy.rounds] == ["completed"] * ROUNDS
    assert strategy.names == {nid: f"flower-{i}" for i, nid in enumerate(NODES, start=1)}
    for r in strategy.rounds:
        crashed = r.server_round == CRASH[1]
        assert r.contributors == tuple(NODES[:3] if crashed else NODES)
        assert r.dropouts == (("flower-4@advertise_keys",) if crashed else ())
        assert r.agreeing_replies == r.replies == (3 if crashed else 4)
    assert secure.train_metrics_clientapp[2]["secagg-dropouts"] == 1

    # the server side saw only the aggregate: all train replies of a round are identical
    train = [m for m in grid.delivered if m.metadata.message_type == "train" and not m.has_error()]
    assert len(train) == 4 * ROUNDS - 1
    by_round: dict[str, list[bytes]] = {}
    for m in train:
        rid = m.content.config_records[SECAGG_RECORD]["round-id"]
        by_round.setdefault(rid, []).append(m.content["arrays"]["w"].numpy().tobytes())
    assert len(by_round) == ROUNDS and all(len(set(v)) == 1 for v in by_round.values())
    plain_train = [m for m in plain_grid.delivered if not m.has_error()]
    assert len({m.content["arrays"]["w"].numpy().tobytes() for m in plain_train[:4]}) == 4


def test_strategy_from_run_config(federation: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(strategy_from_run_config({}, fraction_evaluate=0.0)) is FedAvg
    monkeypatch.setenv("SECAGG_ADMIN_TOKEN", "x" * 32)
    # TLS by default: without a CA the strategy refuses unless plaintext is opted into.
    with pytest.raises(ConfigurationError, match="secagg-ca"):
        strategy_from_run_config({"secagg-server": federation.server.target})
    s = strategy_from_run_config(
        {
            "secagg-server": federation.server.target,
            "secagg-mode": "masked",
            "secagg-clip": 0.5,
            "secagg-insecure-no-tls": "true",
        },
        fraction_evaluate=0.0,
    )
    assert isinstance(s, SecAggFedAvg) and s.clip == 0.5 and s.fraction_evaluate == 0.0
    s.admin.close()
