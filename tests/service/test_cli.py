"""The command line: keygen, enroll, round, simulate over gRPC."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from secagg.keys import IdentityKey
from secagg.service.cli import main
from secagg.service.keyfile import read_identity, read_public_key

from .helpers import TOKEN, Deployment


def test_keygen_writes_a_private_json_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "alice.key"
    assert main(["keygen", "--out", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "secagg-identity-ed25519" and len(bytes.fromhex(doc["seed"])) == 32
    key = read_identity(path)
    assert key.public.hex() == printed["public_key"] == doc["public_key"]
    assert read_public_key(str(path) + ".pub") == key.public
    assert main(["keygen", "--out", str(path)]) == 2  # never overwrites silently
    os.chmod(path, 0o644)
    with pytest.raises(Exception, match="readable by other users"):
        read_identity(path)


def test_enroll_into_a_local_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "s.db")
    key = tmp_path / "k"
    assert main(["keygen", "--out", str(key)]) == 0
    capsys.readouterr()
    assert main(["enroll", "alice", "--public-key", f"{key}.pub", "--store", store]) == 0
    assert main(["enroll", "--list", "--store", store]) == 0
    assert '"name": "alice"' in capsys.readouterr().out
    assert main(["enroll", "alice", "--revoke", "--store", store]) == 0
    assert main(["audit", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "participant_enrolled name=alice" in out and "participant_revoked" in out


def test_round_commands_against_a_server(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SECAGG_ADMIN_TOKEN", TOKEN)
    remote = ["--server", deployment.target]
    for name in ("a", "b", "c"):
        assert main(["enroll", name, "--public-key", IdentityKey().public.hex(), *remote]) == 0
    assert main(["enroll", "d", "--public-key", bytes(32).hex(), *remote]) == 1  # small order
    capsys.readouterr()
    assert (
        main(
            [
                "round",
                "create",
                "--job",
                "j",
                "--participants",
                "a,b,c",
                "--dim",
                "10",
                "--stage-timeout",
                "0.5",
                *remote,
            ]
        )
        == 0
    )
    created = json.loads(capsys.readouterr().out)
    assert created["status"] == "running" and created["participants"] == {
        "1": "a",
        "2": "b",
        "3": "c",
    }
    assert (
        main(["round", "abort", created["round_id"], "--reason", "test", *remote]) == 0
    )  # abort succeeded (issue 12: it exited 3)
    aborted = json.loads(capsys.readouterr().out)
    assert aborted["abort"] == {"stage": "advertise_keys", "reason": "test"}
    monkeypatch.delenv("SECAGG_ADMIN_TOKEN")
    assert main(["round", "status", created["round_id"], *remote]) == 2  # no token


def test_simulate_over_grpc_prints_the_in_process_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "simulate",
        "--clients",
        "6",
        "--dim",
        "2000",
        "--dropout",
        "0.2",
        "--drop-stage",
        "consistency",
        "--seed",
        "3",
        "--json",
    ]
    assert main(args) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*args, "--transport", "grpc", "--stage-timeout", "2"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert set(local) <= set(remote)
    for key in (
        "status",
        "clients",
        "dim",
        "neighbors",
        "threshold",
        "dropped",
        "survivors",
        "exact",
    ):
        assert remote[key] == local[key], key
    assert remote["exact"] is True
    assert set(remote["stage_seconds"]) == {
        "advertise_keys",
        "reveal_nonces",
        "share_keys",
        "masked_input",
        "consistency",
        "unmasking",
    }


def test_keygen_ckks_writes_a_secret_and_a_keyless_server_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from secagg import ckks
    from secagg.errors import ConfigurationError
    from secagg.params import make_params

    out = tmp_path / "fed"
    assert main(["keygen", "--ckks", "--out", str(out)]) == 2  # no --clients/--dim
    assert "--clients and --dim" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    args = ["keygen", "--ckks", "--mode", "hybrid", "--clients", "6", "--dim", "300"]
    assert main([*args, "--out", str(out)]) == 0
    secret = tmp_path / "fed.ckks-secret"
    server = tmp_path / "fed.ckks-server"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    he = make_params(6, 300, mode="hybrid", max_weight=65535).he  # keygen default
    ckks.load_secret_context(secret.read_bytes(), he)
    ckks.load_server_context(server.read_bytes(), he)
    with pytest.raises(ConfigurationError, match="secret key"):
        ckks.load_server_context(secret.read_bytes(), he)
    assert main([*args, "--out", str(out)]) == 2  # never overwrites without --force


def test_round_create_layout_argument() -> None:
    """``round create --layout`` takes 64 hex digits (or nothing); anything else is refused."""
    from secagg.errors import ConfigurationError
    from secagg.service.cli import _layout_arg

    assert _layout_arg("") == b""
    assert _layout_arg("ab" * 32) == bytes([0xAB]) * 32
    for bad in ("ab" * 31, "zz" * 32):
        with pytest.raises(ConfigurationError, match="--layout"):
            _layout_arg(bad)
