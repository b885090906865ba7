"""The PyTorch example scripts (examples/torch_scripts/) and their rewrite for gradmesh
(``run_on_gradmesh.py``, which lives next to them for users too), for the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "examples" / "torch_scripts"

_spec = importlib.util.spec_from_file_location("run_on_gradmesh", SCRIPTS / "run_on_gradmesh.py")
assert _spec is not None and _spec.loader is not None
run_on_gradmesh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_on_gradmesh)
