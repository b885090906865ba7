"""Importers: models that already exist become gradmesh graphs.

``from_torch`` maps a PyTorch module (through ``torch.export``) and ``from_onnx`` an ONNX
model onto the op registry; what the registry cannot express is refused with
``UnsupportedModelError``, which lists every unsupported op and where it occurs. An
importer never runs the user's code on a worker (DESIGN.md section 3).
"""

from __future__ import annotations

from typing import Any

from .errors import Unsupported, UnsupportedModelError

__all__ = [
    "Unsupported",
    "UnsupportedModelError",
    "from_onnx",
    "from_torch",
    "to_torch_state_dict",
]


def __getattr__(name: str) -> Any:
    # torch and onnx are optional extras: import each only when its importer is asked for.
    if name in ("from_torch", "to_torch_state_dict"):
        from . import torch as _torch

        return getattr(_torch, name)
    if name == "from_onnx":
        from . import onnx as _onnx

        return _onnx.from_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
