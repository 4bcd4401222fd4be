"""The Flower adapter's configuration: run-config keys, the admin connection (TLS by
default, mutual TLS over real loopback gRPC), the node-config-only trust keys, and the
conversion of Flower's own SecAgg+ settings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from secagg.errors import ConfigurationError, PolicyViolation
from secagg.params import make_params
from secagg.policy import ClientPolicy
from secagg.server import StageTimeouts
from secagg.service import kit as kf
from secagg.service.errors import TlsError

from .conftest import Federation, Kits

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from secagg.service.integrations.flower import (  # noqa: E402
    RUN_CONFIG_KEYS,
    SecAggFedAvg,
    admin_from_run_config,
    connect_from_config,
    from_flower_secaggplus,
    round_options_from_run_config,
    strategy_from_run_config,
)

# --- run-config keys -------------------------------------------------------------------


def test_round_options_parse_every_key(tmp_path: Path) -> None:
    ctx = tmp_path / "fed.ckks-server"
    ctx.write_bytes(b"context bytes")  # read here; the server checks it at round creation
    opts = round_options_from_run_config(
        {
            "secagg-job": "j",
            "secagg-mode": "Hybrid",
            "secagg-clip": "0.5",
            "secagg-bits": 12,
            "secagg-max-weight": "1000",
            "secagg-neighbors": 6,
            "secagg-threshold": "5",
            "secagg-tolerate-dropout": 0.2,
            "secagg-stage-timeout": 7,
            "secagg-timeout-masked-input": 40.0,
            "secagg-round-timeout": 99,
            "secagg-ckks-server": str(ctx),
            "num-server-rounds": 3,  # the app's own keys pass
        }
    )
    assert opts == {
        "job": "j",
        "mode": "hybrid",
        "clip": 0.5,
        "bits": 12,
        "max_weight": 1000,
        "neighbors": "6",
        "threshold": "5",
        "tolerate_dropout": 0.2,
        "round_timeout": 99.0,
        "deadlines": StageTimeouts(**{**vars(StageTimeouts.uniform(7.0)), "masked_input": 40.0}),
        "he_context": b"context bytes",
    }
    # "" means unset (an app lists every key it lets `flwr run --run-config` override)
    empty = round_options_from_run_config({k: "" for k in RUN_CONFIG_KEYS})
    assert empty["clip"] == 1.0 and empty["bits"] == 16 and empty["neighbors"] == "auto"
    assert "deadlines" not in empty and "he_context" not in empty


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("secagg-mode", "paillier"),
        ("secagg-clip", 0),
        ("secagg-clip", "nan"),
        ("secagg-clip", True),
        ("secagg-bits", 33),
        ("secagg-bits", "16.5"),
        ("secagg-max-weight", 0),
        ("secagg-neighbors", "some"),
        ("secagg-neighbors", 0),
        ("secagg-threshold", "all"),
        ("secagg-threshold", -2),
        ("secagg-tolerate-dropout", 1.0),
        ("secagg-stage-timeout", -1),
        ("secagg-timeout-unmasking", "soon"),
        ("secagg-round-timeout", "inf"),
        ("secagg-job", 5),
        ("secagg-treshold", 3),  # a typo is refused, not ignored
        ("secagg-site-kit", "kits/sites/site-1"),  # a node's key, not the run's
    ],
)
def test_bad_run_config_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=f"^run config {key}: ") as err:
        round_options_from_run_config({key: value})
    assert "\n" not in str(err.value)


def test_he_modes_need_the_server_context(tmp_path: Path) -> None:
    for mode in ("hybrid", "ckks"):
        with pytest.raises(ConfigurationError, match=r"^run config secagg-ckks-server: a "):
            round_options_from_run_config({"secagg-mode": mode})
    with pytest.raises(ConfigurationError, match="secagg-ckks-server: cannot read"):
        round_options_from_run_config(
            {"secagg-mode": "ckks", "secagg-ckks-server": str(tmp_path / "missing")}
        )


def test_admin_keys_name_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SECAGG_ADMIN_TOKEN", raising=False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "secagg-server"),
        ({"secagg-server": "h:1"}, "secagg-ca"),
        ({"secagg-server": "h:1", "secagg-ca": "ca.pem", "secagg-cert": "c.pem"}, "secagg-key"),
        ({"secagg-server": "h:1", "secagg-insecure-no-tls": True}, "secagg-operator-kit"),
        (
            {"secagg-server": "h:1", "secagg-ca": "ca.pem", "secagg-operator": "alice"},
            "secagg-operator-key",
        ),
        ({"secagg-operator-kit": "k", "secagg-ca": "ca.pem"}, "secagg-ca"),
        (
            {
                "secagg-server": "h:1",
                "secagg-insecure-no-tls": "true",
                "secagg-admin-token-file": str(tmp_path / "none"),
            },
            "secagg-admin-token-file",
        ),
    ]
    for rc, key in cases:
        with pytest.raises(ConfigurationError, match=f"^run config {key}: "):
            admin_from_run_config(rc)


# --- the admin connection over real loopback gRPC ---------------------------------------


def test_admin_over_mutual_tls_from_the_operator_kit(kits: Kits) -> None:
    """``secagg-operator-kit``: CA, client certificate and operator key from the kit."""
    s = strategy_from_run_config({"secagg-operator-kit": str(kits.operator)})
    try:
        assert isinstance(s, SecAggFedAvg)
        assert {p.name for p in s.admin.participants()} >= {f"site-{i}" for i in range(1, 5)}
    finally:
        s.admin.close()


def test_admin_over_mutual_tls_from_explicit_files(kits: Kits) -> None:
    """CA + client certificate + key + operator key as separate keys; without the client
    certificate the mutual-TLS server closes the handshake (one TlsError, no retry loop)."""
    op = kits.operator
    manifest = kf.load_kit(op, "operator")
    rc = {
        "secagg-server": manifest.server,
        "secagg-ca": str(op / kf.CA),
        "secagg-cert": str(op / kf.CERT),
        "secagg-key": str(op / kf.KEY),
        "secagg-operator": manifest.name,
        "secagg-operator-key": str(op / kf.OPERATOR_KEY),
    }
    with admin_from_run_config(rc) as admin:
        assert len(admin.participants()) >= 4
    no_cert = {k: v for k, v in rc.items() if k not in ("secagg-cert", "secagg-key")}
    with admin_from_run_config(no_cert) as admin, pytest.raises(TlsError, match="certificate"):
        admin.participants()


def test_plain_fedavg_without_a_server() -> None:
    assert type(strategy_from_run_config({}, fraction_evaluate=0.0)) is FedAvg
    assert (
        type(strategy_from_run_config({"secagg-server": "", "secagg-operator-kit": ""})) is FedAvg
    )


# --- the node side: trust comes from the node config only --------------------------------


def _context(node: dict[str, Any], run: dict[str, Any]) -> Any:
    return Context(1, 5, node, RecordDict(), run)


def test_run_config_cannot_lower_a_nodes_trust(federation: Federation, tmp_path: Path) -> None:
    """Attack: the run config is written by whoever submits the run and reaches every node
    through the SuperLink (the server's side). Before this fix ``connect_from_config`` read
    every key from the node config *then the run config*, so a run config with
    ``secagg-insecure-no-tls=true`` / ``secagg-trust-server-directory=true`` made a node
    that had set neither connect in the clear and accept a directory the server controls.
    Now those keys (and the identity, CA, authority, modes, CKKS secret) are read from the
    node config only."""
    from secagg.service.keyfile import write_identity

    key = tmp_path / "site.key"
    write_identity(key)
    node = {"secagg-identity": str(key)}
    hostile = {
        "secagg-server": federation.server.target,
        "secagg-insecure-no-tls": "true",
        "secagg-trust-server-directory": "true",
        "secagg-allowed-modes": "masked,hybrid,ckks",
    }
    with pytest.raises(ConfigurationError, match="needs secagg-ca"):
        connect_from_config(_context(node, hostile))
    node["secagg-insecure-no-tls"] = "true"  # the node's own (loopback) choice
    client = connect_from_config(_context(node, hostile))
    try:
        assert client.policy.trust_server_directory is False
        assert client.policy.allowed_modes == frozenset({"masked", "hybrid"})
    finally:
        client.close()


def test_node_allowed_modes_key() -> None:
    node = {"secagg-identity": "x", "secagg-server": "h:1", "secagg-allowed-modes": "masked,rsa"}
    with pytest.raises(ConfigurationError, match=r"^node config secagg-allowed-modes: "):
        connect_from_config(_context(node, {}))


def test_site_kit_node_config(kits: Kits) -> None:
    """``secagg-site-kit``: the kit's identity, mTLS, authority and CKKS secret (key holder)."""
    client = connect_from_config(_context({"secagg-site-kit": str(kits.site(2))}, {}))
    try:
        assert client.tls is not None and client.tls.cert is not None
        assert client.policy.authority is not None
        assert client.he_secret_path == kits.site(2) / kf.CKKS_SECRET
    finally:
        client.close()


# --- Flower's SecAgg+ settings -------------------------------------------------------------


def _flower_neighbourhoods(n: int, num_shares: int) -> list[set[int]]:
    """Flower 1.42's neighbour sets (``secaggplus_workflow.py``, setup_stage), unshuffled."""
    half = num_shares >> 1
    return [{(i + o) % n for o in range(-half, half + 1)} for i in range(n)]


@pytest.mark.parametrize(("n", "shares"), [(10, 5), (50, 15), (9, 9)])
def test_num_shares_counts_the_client_itself(n: int, shares: int) -> None:
    """Known answer from Flower's own construction: a node's set holds num_shares nodes,
    itself included, so our degree (neighbours, not counting the client) is num_shares - 1."""
    sets = _flower_neighbourhoods(n, shares)
    assert all(i in s and len(s) == shares for i, s in enumerate(sets))
    t = shares // 2 + 1
    s = from_flower_secaggplus(shares, t, n_clients=n, allow_insecure=True)
    assert (s.degree, s.threshold) == (shares - 1, t)


def test_flower_fractions_and_even_counts_resolve_as_flower_does() -> None:
    s = from_flower_secaggplus(1.0, 0.7, n_clients=10)  # the full graph, classic SecAgg
    assert (s.num_shares, s.degree, s.threshold) == (10, 9, 7)  # round(0.7 * 10) = 7
    assert s.strategy_kwargs()["neighbors"] == "all"
    s = from_flower_secaggplus(0.4, 0.6, n_clients=10, allow_insecure=True)
    assert s.num_shares == 5  # round(4.0) = 4 is even: Flower adds one
    assert s.threshold == 3
    s = from_flower_secaggplus(6, 4, n_clients=20, allow_insecure=True)
    assert s.num_shares == 7  # an even integer: Flower warns and adds one


def test_flower_quantization_and_weight_map_to_ours() -> None:
    s = from_flower_secaggplus(1.0, 0.7, n_clients=10, timeout=45.0)
    assert s.clip == 8.0 and s.bits == 23 and (1 << s.bits) - 1 >= 1 << 22
    assert s.max_weight == 1000 and s.deadlines == StageTimeouts.uniform(45.0)
    assert s.run_config()["secagg-bits"] == 23 and s.run_config()["secagg-stage-timeout"] == 45.0
    s = from_flower_secaggplus(1.0, 0.7, n_clients=10, max_weight=12.5, quantization_range=255)
    assert s.max_weight == 13 and s.bits == 8
    assert round_options_from_run_config(s.run_config())["bits"] == 8


def test_flowers_example_settings_are_refused() -> None:
    """Flower's documented example (num_shares=3, reconstruction_threshold=2) gives k=2, t=2
    at 100 clients: below the default policy's 2^-40 target, so the converter refuses it
    with the policy's own message (a site would refuse the round the same way)."""
    with pytest.raises(PolicyViolation, match=r"n=100, k=2, t=2"):
        from_flower_secaggplus(3, 2, n_clients=100)
    s = from_flower_secaggplus(3, 2, n_clients=100, allow_insecure=True)
    assert any(note.startswith("REFUSED") for note in s.notes)
    # t too low for the neighbourhood: 2t <= k + 1 lets a server collect both secrets
    with pytest.raises(PolicyViolation, match="2t=4 <= k\\+1=4"):
        from_flower_secaggplus(4, 2, n_clients=4)
    # and the accepted ones are exactly what the policy accepts
    s = from_flower_secaggplus(1.0, 0.7, n_clients=10)
    ClientPolicy().check_params(
        make_params(
            10, 1, bits=s.bits, max_weight=s.max_weight, neighbors=s.degree, threshold=s.threshold
        )
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((2, 1), "num_shares as an integer must be > 2"),  # Flower refuses it too
        ((5, 5), "must be below num_shares"),
        ((0.0, 0.5), "num_shares as a fraction"),
        ((5, 1.5), "reconstruction_threshold as a fraction"),
    ],
)
def test_settings_flower_refuses_are_refused(args: tuple[Any, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        from_flower_secaggplus(*args, n_clients=10)


def test_flower_overflow_is_noted() -> None:
    """Flower's 2^32 modulus wraps past 1,023 clients at its defaults; ours cannot."""
    s = from_flower_secaggplus(1.0, 0.75, n_clients=1100, allow_insecure=True)
    assert any("wrap" in note for note in s.notes)
    assert math.ceil(math.log2(1100)) + 23 + 10 <= 64  # our lane fits 64 bits
