"""hybrid and ckks rounds through the Flower adapter: the strategy hands the server's CKKS
context to every round (run config ``secagg-ckks-server``), each node decrypts with its
secret context (node config ``secagg-ckks-secret``); and a site refuses a round whose
run-config parameters are weaker than its policy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from secagg import ckks
from secagg.params import make_params

from .conftest import Federation

flwr = pytest.importorskip("flwr")

from flwr.serverapp.strategy import FedAvg  # noqa: E402

from secagg.service.integrations.flower import (  # noqa: E402
    SecAggFedAvg,
    round_options_from_run_config,
)

from .flower_app import DEADLINES, NODES, client_app, enroll_nodes, run  # noqa: E402
from .flower_local import LocalGrid  # noqa: E402

ROUNDS = 2
DIM = 5  # w (4) and b (1)
MAX_WEIGHT = 1000


@pytest.fixture(scope="module")
def node_configs(
    federation: Federation, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, dict[str, Any]]:
    return enroll_nodes(federation, tmp_path_factory.mktemp("keys"))


def _contexts(tmp: Path, mode: str) -> tuple[Path, Path]:
    """The key holders' secret context (0600) and the server's, as keygen --ckks writes."""
    he = make_params(len(NODES), DIM, mode=mode, max_weight=MAX_WEIGHT).he
    secret = ckks.make_secret_context(he)
    secret_path, server_path = tmp / f"{mode}.ckks-secret", tmp / f"{mode}.ckks-server"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    server_path.write_bytes(ckks.make_public_context(secret))
    return secret_path, server_path


def _strategy(federation: Federation, **extra: Any) -> tuple[SecAggFedAvg, dict[str, Any]]:
    """The strategy the run config describes, on the fixture's admin connection (the admin
    keys have their own tests in test_flower_config.py)."""
    rc = {
        "secagg-server": federation.server.target,
        "secagg-clip": 1.0,
        "secagg-max-weight": MAX_WEIGHT,
        "secagg-timeout-advertise-keys": DEADLINES.advertise_keys,
        "secagg-timeout-masked-input": DEADLINES.masked_input,
        **extra,
    }
    options = round_options_from_run_config(rc)
    return SecAggFedAvg(
        federation.admin, fraction_evaluate=0.0, min_available_nodes=4, **options
    ), rc


@pytest.mark.parametrize("mode", ["hybrid", "ckks"])
def test_he_round_through_flower_matches_fedavg(
    federation: Federation,
    node_configs: dict[int, dict[str, Any]],
    tmp_path: Path,
    mode: str,
) -> None:
    secret, server_ctx = _contexts(tmp_path, mode)
    nodes = {
        nid: {
            **cfg,
            "secagg-ckks-secret": str(secret),
            "secagg-allowed-modes": "masked,hybrid,ckks" if mode == "ckks" else "masked,hybrid",
        }
        for nid, cfg in node_configs.items()
    }
    plain = run(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=4),
        LocalGrid(client_app(crash=None), nodes),
        ROUNDS,
    )
    strategy, rc = _strategy(
        federation,
        **{"secagg-mode": mode, "secagg-ckks-server": str(server_ctx), "secagg-job": f"he-{mode}"},
    )
    secure = run(strategy, LocalGrid(client_app(crash=None), nodes, rc), ROUNDS)
    for key in ("w", "b"):
        diff = np.abs(secure.arrays[key].numpy() - plain.arrays[key].numpy()).max()
        assert diff < ROUNDS * 2.0 / 65535 + 1e-5, (key, diff)
    assert [r.status for r in strategy.rounds] == ["completed"] * ROUNDS
    assert all(r.agreeing_replies == r.replies == 4 for r in strategy.rounds)
    assert strategy.mode == mode and strategy.he_context == server_ctx.read_bytes()


def test_site_refuses_weaker_run_config_parameters(
    federation: Federation,
    node_configs: dict[int, dict[str, Any]],
) -> None:
    """Attack: the run config (the server's side) asks for k=3 neighbours and t=2 among 4
    sites: 2t <= k+1, so a malicious server could collect both secrets of a site. The
    server creates the round (with a warning); every site's own policy refuses it before
    sending anything, so the round yields no aggregate. (Without the client-side
    check the sites would join; the server alone only warns.)"""
    strategy, rc = _strategy(
        federation,
        **{
            "secagg-neighbors": 3,
            "secagg-threshold": 2,
            "secagg-job": "weak",
            "secagg-stage-timeout": 2.0,
        },
    )
    grid = LocalGrid(client_app(crash=None), node_configs, rc)
    result = run(strategy, grid, 1)
    train = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert len(train) == 4 and all(m.has_error() for m in train)
    assert all("PolicyRefused" in m.error.reason and "2t=4" in m.error.reason for m in train)
    assert strategy.rounds[0].agreeing_replies == 0
    assert len(result.arrays) == 0  # Flower's Result: no round produced a model
