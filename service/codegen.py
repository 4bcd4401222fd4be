"""Regenerate ``service/_gen`` from ``service/proto`` (``python -m secagg.service.codegen``).

protoc writes modules that import each other as ``secagg.v1.*``; they live in
``secagg.service._gen``, so the imports are rewritten. The drift test runs :func:`generate`
into a temporary directory and compares the result with the checked-in files.
"""

from __future__ import annotations

import importlib
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["GEN_DIR", "PROTO_DIR", "PROTO_FILES", "generate", "main"]

SERVICE_DIR = Path(__file__).resolve().parent
PROTO_DIR = SERVICE_DIR / "proto"
GEN_DIR = SERVICE_DIR / "_gen"
PROTO_FILES = ("secagg/v1/common.proto", "secagg/v1/aggregation.proto", "secagg/v1/admin.proto")
GEN_PACKAGE = "secagg.service._gen"

_FROM_IMPORT = re.compile(r"^from secagg\.v1 import ", re.MULTILINE)
_DOTTED = re.compile(r"\bsecagg\.v1\.(\w+_pb2(?:_grpc)?)\b")


STUB_HEADER = "# mypy: ignore-errors\n"
"""Generated stubs are not held to ``mypy --strict`` (their grpc stubs do not pass it)."""


def _fix(name: str, text: str) -> str:
    text = _FROM_IMPORT.sub(f"from {GEN_PACKAGE} import ", text)
    text = _DOTTED.sub(rf"{GEN_PACKAGE}.\1", text)
    return STUB_HEADER + text if name.endswith(".pyi") else text


def _plugins() -> list[str]:
    """mypy-protobuf's plugins by absolute path: the venv's bin/ need not be on PATH."""
    bindir = Path(sys.executable).parent
    out = []
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        exe = bindir / name
        if exe.exists():
            out.append(f"--plugin={name}={exe}")
    return out


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules (flat, imports fixed) into ``out_dir``; return them."""
    protoc = importlib.import_module("grpc_tools.protoc")  # dev: grpcio-tools, mypy-protobuf

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            *_plugins(),
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *PROTO_FILES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "secagg" / "v1").iterdir()):
            dst = out_dir / src.name
            dst.write_text(_fix(src.name, src.read_text()))
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC and protobuf modules (do not edit; see codegen.py)."""\n')
    return [init, *written]


def main() -> int:
    for path in generate(GEN_DIR):
        print(path.relative_to(SERVICE_DIR.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
