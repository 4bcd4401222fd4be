"""A Flower app (real ServerApp, Strategy, ClientApp and mods) aggregating through secagg."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from secagg.errors import ConfigurationError

from .conftest import Federation

flwr = pytest.importorskip("flwr")

from flwr.serverapp.strategy import FedAvg  # noqa: E402

from secagg.service.integrations.flower import (  # noqa: E402
    SECAGG_RECORD,
    SecAggFedAvg,
    strategy_from_run_config,
)

from .flower_app import CRASH, DEADLINES, NODES, ROUNDS, client_app, enroll_nodes, run  # noqa: E402
from .flower_local import LocalGrid  # noqa: E402


@pytest.fixture(scope="module")
def node_configs(
    federation: Federation, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, dict[str, Any]]:
    return enroll_nodes(federation, tmp_path_factory.mktemp("keys"))


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
