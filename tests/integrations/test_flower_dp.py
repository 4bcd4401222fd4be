"""Flower DP keys: the run config's ``secagg-dp-*`` budget (server side) and the node
config's DP policy (site side, node config only, like the other trust keys)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from secagg.dp.policy import DPPolicy
from secagg.errors import ConfigurationError
from secagg.service.dpbudget import STATE_FILE, SiteBudget
from secagg.service.dpspec import DPSpec

from .conftest import Federation, Kits

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from secagg.service.integrations.flower import (  # noqa: E402
    RUN_CONFIG_KEYS,
    SecAggFedAvg,
    connect_from_config,
    round_options_from_run_config,
    strategy_from_run_config,
)


def _context(node: dict[str, Any], run: dict[str, Any]) -> Any:
    return Context(1, 5, node, RecordDict(), run)


def test_run_config_dp_keys_make_the_rounds_dp_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """``secagg-dp-*`` -> ``SecAggFedAvg(dp=DPSpec(...))`` -> every round's RoundSpec."""
    assert {"secagg-dp-epsilon", "secagg-dp-rounds", "secagg-dp-clip"} <= RUN_CONFIG_KEYS
    rc = {
        "secagg-dp-epsilon": "2.5",
        "secagg-dp-delta": 1e-6,
        "secagg-dp-rounds": 10,
        "secagg-dp-max-withholders": "1",
        "secagg-clip": 0.5,
    }
    opts = round_options_from_run_config(rc)
    assert opts["dp"] == DPSpec(epsilon=2.5, delta=1e-6, rounds=10, clip=0.5, max_withholders=1)
    assert round_options_from_run_config({**rc, "secagg-dp-clip": 2})["dp"].clip == 2.0
    assert "dp" not in round_options_from_run_config({})
    monkeypatch.setenv("SECAGG_ADMIN_TOKEN", "t")
    strategy = strategy_from_run_config(
        {**rc, "secagg-server": "127.0.0.1:1", "secagg-insecure-no-tls": "true"}
    )
    try:
        assert isinstance(strategy, SecAggFedAvg) and strategy.dp == opts["dp"]
    finally:
        strategy.admin.close()


@pytest.mark.parametrize(
    ("rc", "match"),
    [
        ({"secagg-dp-epsilon": "x", "secagg-dp-rounds": 3}, r"^run config secagg-dp-epsilon: "),
        ({"secagg-dp-epsilon": 1}, r"^run config secagg-dp-rounds: needed"),
        ({"secagg-dp-rounds": 3}, r"^run config secagg-dp-rounds: needs secagg-dp-epsilon"),
        (
            {"secagg-dp-epsilon": 1, "secagg-dp-rounds": 3, "secagg-dp-delta": 2},
            r"^run config secagg-dp-delta: expected a number in \(0, 1\)",
        ),
        (
            {"secagg-dp-epsilon": 1, "secagg-dp-rounds": 0},
            r"^run config secagg-dp-rounds: expected an integer",
        ),
    ],
)
def test_bad_dp_run_config_names_the_key(rc: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        round_options_from_run_config(rc)


def test_node_dp_policy_comes_from_the_node_config_only(tmp_path: Path) -> None:
    """Attack: the run config (the server's side) sets ``secagg-dp-max-epsilon=100`` to
    loosen a node's DP policy, or to give a node without one a weak one. The DP policy keys
    are node-config keys: the run config's values are ignored (logged), a run config that
    names them for the server side is refused."""
    from secagg.service.keyfile import write_identity

    key = tmp_path / "site.key"
    write_identity(key)
    node = {
        "secagg-identity": str(key),
        "secagg-server": "127.0.0.1:1",
        "secagg-insecure-no-tls": "true",
        "secagg-trust-server-directory": "true",
        "secagg-dp-max-epsilon": "2",
        "secagg-dp-max-rounds": "5",
        "secagg-dp-max-clip": "1",
        "secagg-dp-state": str(tmp_path / "dp.json"),
    }
    hostile = {"secagg-dp-max-epsilon": "100", "secagg-dp-max-rounds": "1000"}
    client = connect_from_config(_context(node, hostile))
    try:
        assert client.policy.dp == DPPolicy(max_epsilon=2.0, delta=1e-5, max_rounds=5, max_clip=1)
        assert client.dp_budget.path == tmp_path / "dp.json"
    finally:
        client.close()
    bare = {k: v for k, v in node.items() if not k.startswith("secagg-dp-")}
    client = connect_from_config(_context(bare, hostile))
    try:
        assert client.policy.dp is None  # the run config cannot give it one
    finally:
        client.close()
    with pytest.raises(ConfigurationError, match=r"^run config secagg-dp-max-epsilon: a node"):
        round_options_from_run_config(hostile)
    no_state = {k: v for k, v in node.items() if k != "secagg-dp-state"}
    with pytest.raises(ConfigurationError, match=r"^node config secagg-dp-state: "):
        connect_from_config(_context(no_state, {}))
    with pytest.raises(ConfigurationError, match=r"^node config secagg-dp-max-clip: needed"):
        connect_from_config(
            _context({k: v for k, v in node.items() if k != "secagg-dp-max-clip"}, {})
        )


def test_site_kit_keeps_the_dp_ledger_in_the_kit(kits: Kits) -> None:
    """With a site kit the site's own DP ledger defaults to ``dp_state.json`` in the kit."""
    node = {
        "secagg-site-kit": str(kits.site(1)),
        "secagg-dp-max-epsilon": "3",
        "secagg-dp-max-rounds": "3",
        "secagg-dp-max-clip": "1",
    }
    client = connect_from_config(_context(node, {}))
    try:
        assert client.policy.dp is not None and client.policy.dp.max_epsilon == 3.0
        assert client.dp_budget.path == kits.site(1) / STATE_FILE
        assert client.dp_budget.rounds() == []
        mode = stat.S_IMODE((kits.site(1) / STATE_FILE).stat().st_mode)
        assert mode == 0o600
    finally:
        client.close()


def test_flower_app_runs_dp_rounds(
    federation: Federation, tmp_path: Path, warm_dp_kernels: None
) -> None:
    """A Flower app (real ServerApp, strategy, ClientApp, mod) with ``SecAggFedAvg(dp=...)``
    and nodes holding a DP policy in their node config: three DP rounds (node 4 crashes in
    round 2), each charged to the job's ledger with its real contributors, and each node's
    own ledger file holding the rounds it joined."""
    pytest.importorskip("dp_accounting")  # secagg[dp]: the Flower env installs it
    from secagg.service.privacy import JobLedger

    from .flower_app import CRASH, DEADLINES, NODES, ROUNDS, client_app, enroll_nodes, run
    from .flower_local import LocalGrid

    configs = enroll_nodes(federation, tmp_path)
    for i, cfg in enumerate(configs.values(), start=1):
        cfg.update(
            {
                "secagg-dp-max-epsilon": "3",
                "secagg-dp-max-rounds": str(ROUNDS),
                "secagg-dp-max-clip": "1",
                "secagg-dp-state": str(tmp_path / f"dp-{i}.json"),
            }
        )
    strategy = SecAggFedAvg(
        federation.admin,
        job="flower-dp",
        clip=1.0,
        deadlines=DEADLINES,
        fraction_evaluate=0.0,
        min_available_nodes=4,
        dp=DPSpec(epsilon=3.0, delta=1e-5, rounds=ROUNDS, clip=1.0),
    )
    run(strategy, LocalGrid(client_app(), configs))
    assert [r.status for r in strategy.rounds] == ["completed"] * ROUNDS
    rows = JobLedger(federation.store, "flower-dp").rows
    assert [r.contributor_count for r in rows] == [
        3 if i + 1 == CRASH[1] else 4 for i in range(ROUNDS)
    ]
    for i, nid in enumerate(NODES, start=1):
        joined = SiteBudget(tmp_path / f"dp-{i}.json").rounds()
        assert len(joined) == (ROUNDS - 1 if nid == CRASH[0] else ROUNDS)
