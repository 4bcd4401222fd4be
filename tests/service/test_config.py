"""Server configuration: TOML file, environment, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from secagg.errors import ConfigurationError
from secagg.service.config import load_config


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


def test_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('lisen = "typo"\n')
    with pytest.raises(ConfigurationError, match="unknown config keys"):
        load_config(bad)
    with pytest.raises(ConfigurationError, match="max_chunk_bytes"):
        load_config(None, max_chunk_bytes=10)
