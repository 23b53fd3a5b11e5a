"""Generates the Python gRPC stubs from ``serving/proto`` (the .proto is the one source of truth).

Run by the build (``hatch_build.py`` calls :func:`generate` during ``pip install``, editable
installs included) and, as a safety net, by :mod:`serving.pb` at import time when the generated
modules are missing or older than the .proto (a fresh checkout used without reinstalling). The
generated files sit beside the .proto, are git-ignored and never edited by hand. Each one records
the SHA-256 of the .proto it came from, which is how staleness is detected.

This module uses only the standard library and ``grpc_tools``, so the build hook can load it by
path in an isolated build environment.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PROTO_REL = "serving/proto/headwater/v1/recommender.proto"
OUTPUTS = ("recommender_pb2.py", "recommender_pb2_grpc.py", "recommender_pb2.pyi")
_STAMP = "# headwater-proto-sha256: "


def proto_hash(root: Path) -> str:
    return hashlib.sha256((root / PROTO_REL).read_bytes()).hexdigest()


def outputs(root: Path) -> list[Path]:
    """Paths of the generated files, relative to ``root``'s parent of ``serving``."""
    base = (root / PROTO_REL).parent
    return [base / name for name in OUTPUTS]


def is_current(root: Path) -> bool:
    """True when every generated file exists and was made from the current .proto."""
    want = _STAMP + proto_hash(root)
    for path in outputs(root):
        if not path.exists():
            return False
        with path.open() as fh:
            if fh.readline().rstrip("\n") != want:
                return False
    return True


def generate(root: Path) -> list[Path]:
    """Runs protoc (from grpc_tools) on the .proto under ``root``; returns the written files."""
    import grpc_tools
    from grpc_tools import protoc

    root = Path(root).resolve()
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={root}",
            f"--pyi_out={root}", f"--grpc_python_out={root}", str(root / PROTO_REL)]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {PROTO_REL}")
    stamp = _STAMP + proto_hash(root) + "\n"
    for path in outputs(root):
        path.write_text(stamp + path.read_text())
    return outputs(root)
