"""Regenerate ``secagg/_gen`` (``python -m secagg.ckks_codegen``): the reader of CKKS context files.

Generated from the ``tensealcontext.proto`` that TenSEAL ships in its wheel
(``tenseal/proto/``) and from ``secagg/proto/ckks_context.proto``, which appends the key
epoch. protoc writes ``import tensealcontext_pb2``; the modules live in ``secagg._gen``, so
the import is rewritten. Needs ``grpcio-tools`` and ``mypy-protobuf`` (the ``codegen``
extra, installed in the Flower environment as for ``service/_gen``); the drift test
regenerates into a temporary directory and compares.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["GEN_DIR", "PROTO_DIR", "PROTO_FILES", "generate", "main", "tenseal_proto_dir"]

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR / "proto"
GEN_DIR = PACKAGE_DIR / "_gen"
PROTO_FILES = ("tensealcontext.proto", "ckks_context.proto")
GEN_PACKAGE = "secagg._gen"
STUB_HEADER = "# mypy: ignore-errors\n"

_IMPORT = re.compile(r"^import tensealcontext_pb2 as ", re.MULTILINE)
_PYI_IMPORT = re.compile(r"^import tensealcontext_pb2$", re.MULTILINE)


def tenseal_proto_dir() -> Path:
    """The ``proto`` directory of the installed TenSEAL package."""
    spec = importlib.util.find_spec("tenseal")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("TenSEAL is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "proto"


def _fix(name: str, text: str) -> str:
    text = _IMPORT.sub(f"from {GEN_PACKAGE} import tensealcontext_pb2 as ", text)
    if name.endswith(".pyi"):
        text = _PYI_IMPORT.sub(f"from {GEN_PACKAGE} import tensealcontext_pb2", text)
        return STUB_HEADER + text
    return text


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules (imports fixed) into ``out_dir``; return them."""
    protoc = importlib.import_module("grpc_tools.protoc")
    bindir = Path(sys.executable).parent
    plugin = bindir / "protoc-gen-mypy"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            *([f"--plugin=protoc-gen-mypy={plugin}"] if plugin.exists() else []),
            f"-I{tenseal_proto_dir()}",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--mypy_out={tmp}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted(Path(tmp).iterdir()):
            dst = out_dir / src.name
            dst.write_text(_fix(src.name, src.read_text()))
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(
        '"""Generated protobuf modules of the CKKS context files (do not edit; see '
        'secagg/ckks_codegen.py)."""\n'
    )
    return [init, *written]


def main() -> int:
    for path in generate(GEN_DIR):
        print(path.relative_to(PACKAGE_DIR.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
