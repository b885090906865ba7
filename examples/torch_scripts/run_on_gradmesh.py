"""Run a PyTorch script on gradmesh: its import lines rewritten, nothing else changed.

    python examples/torch_scripts/run_on_gradmesh.py examples/torch_scripts/lstm_classifier.py

The rewrite is ``IMPORT_REWRITES``: on a line that imports from ``torch``, the module path
``torch...`` becomes ``gradmesh.core...``, and a bare ``import torch`` becomes ``import
gradmesh.core as torch``, so the script's names stay the same. An import line it cannot
rewrite (``import torch.nn`` without ``as``) is refused rather than left on torch.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

IMPORT_REWRITES = (
    (re.compile(r"^import torch$"), "import gradmesh.core as torch"),
    (re.compile(r"^import torch\.(\S+) as (\w+)$"), r"import gradmesh.core.\1 as \2"),
    (re.compile(r"^from torch(\.\S+)? import (.+)$"), r"from gradmesh.core\1 import \2"),
)
TORCH_IMPORT = re.compile(r"^(import|from) torch\b")


def to_gradmesh(source: str) -> str:
    """The script with its torch import lines pointed at gradmesh.core; nothing else."""
    lines = []
    for line in source.splitlines():
        for pattern, replacement in IMPORT_REWRITES:
            if pattern.match(line):
                line = pattern.sub(replacement, line)
                break
        else:
            if TORCH_IMPORT.match(line):
                raise ValueError(f"no rewrite for the import line {line!r}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def load(path: str | Path, on: str = "gradmesh", name: str | None = None) -> types.ModuleType:
    """The script as a module (``__name__`` is not ``"__main__"``: its ``main()`` does not
    run), on gradmesh or, with ``on="torch"``, as written."""
    path = Path(path)
    source = path.read_text()
    module = types.ModuleType(name or path.stem)
    module.__file__ = str(path)
    code = to_gradmesh(source) if on == "gradmesh" else source
    exec(compile(code, module.__file__, "exec"), module.__dict__)
    return module


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: {argv[0]} SCRIPT.py")
    load(argv[1], name="__main__")


if __name__ == "__main__":
    main(sys.argv)
