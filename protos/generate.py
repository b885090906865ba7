"""Regenerate the Python code for the .proto files (run after editing a .proto):

    python protos/generate.py

The generated *_pb2.py, *_pb2_grpc.py and *.pyi files are committed next to the .proto
files; tests/wire/test_protos.py fails when they are stale.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PROTO_DIR = HERE / "gradmesh" / "v1"


def generate(out_dir: pathlib.Path = PROTO_DIR) -> list[pathlib.Path]:
    """Run grpcio-tools' protoc into ``out_dir``; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    tmp = out_dir / "_gen"
    tmp.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={tmp}",
        f"--pyi_out={tmp}",
        f"--grpc_python_out={tmp}",
    ] + [str(p.relative_to(HERE)) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for f in sorted((tmp / "gradmesh" / "v1").iterdir()):
        text = f.read_text()
        # The package is imported as gradmesh.v1 (setuptools package-dir), so the generated
        # imports "from gradmesh.v1 import x_pb2" work as they are.
        target = out_dir / f.name
        target.write_text(text)
        written.append(target)
    import shutil

    shutil.rmtree(tmp)
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(HERE.parent))
    sys.exit(0)
