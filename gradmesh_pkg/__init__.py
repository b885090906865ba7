"""gradmesh: distributed gradient computation as a service.

``gradmesh.core`` is the autograd engine, ``gradmesh.client`` the SDK, ``gradmesh.server``
the services and ``gradmesh.v1`` the generated gRPC contract. The importers are here too:
``gradmesh.from_torch``, ``gradmesh.from_onnx`` and ``gradmesh.to_torch_state_dict``.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__ as __version__

_IMPORTERS = ("from_torch", "from_onnx", "to_torch_state_dict")


def __getattr__(name: str) -> Any:
    # Lazily: `import gradmesh` stays cheap and needs neither torch nor onnx.
    if name in _IMPORTERS:
        from gradmesh.client import importers

        return getattr(importers, name)
    raise AttributeError(f"module 'gradmesh' has no attribute {name!r}")
