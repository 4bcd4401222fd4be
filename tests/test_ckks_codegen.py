"""The checked-in reader of CKKS context files matches TenSEAL's shipped ``tensealcontext.proto``
and ``secagg/proto/ckks_context.proto``."""

from __future__ import annotations

from pathlib import Path

import pytest

from secagg import ckks
from secagg.ckks_codegen import GEN_DIR, generate
from secagg.errors import ConfigurationError
from secagg.he_params import select_params


def test_generated_reader_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    checked_in = {p.name: p.read_text() for p in GEN_DIR.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(checked_in), "files added or removed: run ckks_codegen"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"secagg/_gen is stale ({stale}): python -m secagg.ckks_codegen"


def test_context_file_is_a_tenseal_context_with_an_epoch() -> None:
    """The generated ContextFile reads TenSEAL's fields 1..4 and the key epoch (field 100)."""
    import tenseal as ts

    from secagg._gen.ckks_context_pb2 import ContextFile

    p = select_params(4, 8, 1_000, "hybrid")
    secret = ckks.make_secret_context(p, epoch=5, decryption_budget=7)
    msg = ContextFile.FromString(secret)
    assert msg.private_context.secret_key and msg.public_context.scale == p.scale
    assert (msg.key_epoch.epoch, msg.key_epoch.budget, len(msg.key_epoch.key_id)) == (5, 7, 16)
    assert ts.Context.load(secret, n_threads=1).is_private()
    public = ckks.make_public_context(secret)
    assert ContextFile.FromString(public).key_epoch == msg.key_epoch
    assert ts.Context.load(public, n_threads=1).is_private() is False
    with pytest.raises(ConfigurationError, match="not a context protobuf"):
        ckks.load_server_context(b"\xff\xff\xff", p)
