"""Server configuration: TOML file, environment, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from secagg.errors import ConfigurationError
from secagg.service.config import ServerConfig, load_config


def test_file_env_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("from-file\n")
    cfg_file = tmp_path / "server.toml"
    cfg_file.write_text(
        f"""
listen = "0.0.0.0:9000"
store = "{tmp_path / "a.db"}"
admin_token_file = "{tmp_path / "token"}"
workers = 2

[tls]
cert = "s.pem"
key = "s.key"
client_ca = "ca.pem"

[deadlines]
masked_input = 300
"""
    )
    cfg = load_config(cfg_file)
    assert cfg.listen == "0.0.0.0:9000" and cfg.workers == 2 and cfg.admin_token == "from-file"
    assert cfg.tls is not None and cfg.tls.mutual and cfg.tls.bind_names
    assert cfg.deadlines.masked_input == 300 and cfg.deadlines.share_keys == 30
    monkeypatch.setenv("SECAGG_ADMIN_TOKEN", "from-env")
    cfg = load_config(cfg_file, listen="127.0.0.1:1", workers=None)
    assert cfg.admin_token == "from-env" and cfg.listen == "127.0.0.1:1" and cfg.workers == 2


@pytest.mark.parametrize("listen", ["0.0.0.0:9000", "[::]:9000", "10.0.0.5:1", "example.org:1"])
def test_plaintext_on_a_non_loopback_address_needs_the_opt_in(listen: str) -> None:
    """Attack: a server started without certificates on a public address serves every
    participant's traffic readable and unauthenticated. Before the fix it started silently;
    now it refuses unless ``insecure_no_tls`` (``--insecure-no-tls``) is given."""
    with pytest.raises(ConfigurationError, match="without TLS"):
        ServerConfig(listen=listen)
    assert ServerConfig(listen=listen, insecure_no_tls=True).tls is None
    for loopback in ("127.0.0.1:0", "localhost:1", "[::1]:2"):
        assert ServerConfig(listen=loopback).tls is None


def test_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('lisen = "typo"\n')
    with pytest.raises(ConfigurationError, match="unknown config keys"):
        load_config(bad)
    with pytest.raises(ConfigurationError, match="max_chunk_bytes"):
        load_config(None, max_chunk_bytes=10)


def test_serve_refuses_plaintext_on_a_public_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``secagg serve --listen 0.0.0.0:...`` without certificates: before the fix it served
    plaintext gRPC to the network; now it exits with the configuration error (code 2)."""
    from secagg.service.cli import main

    assert main(["serve", "--listen", "0.0.0.0:0", "--store", str(tmp_path / "s.db")]) == 2
    assert "--insecure-no-tls" in capsys.readouterr().err
