"""The checked-in generated code matches the .proto files."""

from __future__ import annotations

from pathlib import Path

import pytest

from secagg.service.codegen import GEN_DIR, generate


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = {p.name: p.read_text() for p in generate(tmp_path)}
    checked_in = {p.name: p.read_text() for p in GEN_DIR.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(checked_in), "files added or removed: run codegen"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"service/_gen is stale ({stale}): python -m secagg.service.codegen"


def test_generated_modules_import_from_the_package() -> None:
    from secagg.service._gen import admin_pb2_grpc, aggregation_pb2

    assert aggregation_pb2.RoundInfo.__module__ == "secagg.service._gen.aggregation_pb2"
    assert hasattr(admin_pb2_grpc, "AdminStub")
