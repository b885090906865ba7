"""The committed generated protobuf code must be what protos/generate.py produces."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "gradmesh" / "v1"


def _generate_module():
    spec = importlib.util.spec_from_file_location(
        "_gradmesh_generate", ROOT / "protos" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    written = _generate_module().generate(tmp_path)
    names = sorted(p.name for p in written)
    assert names, "generate() wrote nothing"
    protos = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
    for stem in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"{stem}{suffix}" in names, f"{stem}{suffix} was not generated"
    stale = [
        n
        for n in names
        if not (PROTO_DIR / n).exists() or (PROTO_DIR / n).read_text() != (tmp_path / n).read_text()
    ]
    assert not stale, (
        f"generated code is stale or missing for {stale}: run "
        f"`python protos/generate.py` and commit the result"
    )
    committed = {
        p.name
        for p in PROTO_DIR.iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    orphans = sorted(committed - set(names))
    assert not orphans, f"generated files without a .proto: {orphans}"
