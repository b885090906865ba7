"""``gradmesh.core.save`` / ``load``: state dicts in a NumPy ``.npz`` file, never pickle.

The file holds each tensor (or array) as an ``.npz`` member, ``t0``, ``t1``, ..., and the
structure around them (dicts, lists, tuples, numbers, strings, None) as JSON in the member
``__structure__``. Loading runs ``numpy.load(allow_pickle=False)`` and builds only those
types: a file cannot run code, unlike a pickle.

>>> import io, gradmesh.core as gm
>>> buf = io.BytesIO()
>>> gm.save({"w": gm.ones(2), "step": 3}, buf)
>>> _ = buf.seek(0)
>>> gm.load(buf)
{'w': tensor([1., 1.]), 'step': 3}
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from . import backend
from .tensor import Tensor

__all__ = ["save", "load"]

_STRUCTURE = "__structure__"


def save(obj: Any, f) -> None:
    """Write ``obj`` (a state dict: nested dicts, lists and tuples of tensors, arrays,
    numbers, strings and None) to the path or binary file ``f``."""
    arrays: dict[str, np.ndarray] = {}
    structure = _encode(obj, arrays)
    meta = np.frombuffer(json.dumps(structure).encode(), dtype=np.uint8)
    if isinstance(f, (str, os.PathLike)):
        # np.savez would append ".npz" to a path; torch.save(sd, "model.pt") writes model.pt.
        with open(f, "wb") as file:
            np.savez(file, **{_STRUCTURE: meta}, **arrays)
    else:
        np.savez(f, **{_STRUCTURE: meta}, **arrays)


def load(f, map_location=None, weights_only: bool = True) -> Any:
    """Read what ``save`` wrote; tensors land on ``map_location`` (default: the CPU).
    ``weights_only`` is accepted for torch's signature: nothing else can be loaded."""
    with np.load(f, allow_pickle=False) as data:
        structure = json.loads(bytes(data[_STRUCTURE]).decode())
        arrays = {k: data[k] for k in data.files if k != _STRUCTURE}
    return _decode(structure, arrays, map_location)


def _encode(obj, arrays: dict) -> Any:
    if isinstance(obj, Tensor) or isinstance(obj, np.ndarray):
        key = f"t{len(arrays)}"
        is_tensor = isinstance(obj, Tensor)
        arrays[key] = backend.to_numpy(obj._data) if is_tensor else obj
        return {
            "tensor" if is_tensor else "array": key,
            "requires_grad": bool(is_tensor and obj.requires_grad),
        }
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, arrays), _encode(v, arrays)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [_encode(v, arrays) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, np.generic):
        return {"value": obj.item()}
    raise TypeError(
        f"save: cannot store a {type(obj).__name__}; a state dict holds tensors, "
        f"arrays, numbers, strings, None and dicts/lists/tuples of them"
    )


def _decode(node: dict, arrays: dict, map_location) -> Any:
    if "tensor" in node:
        t = Tensor(arrays[node["tensor"]])
        if map_location is not None:
            t = t.to(str(map_location))
        return t.requires_grad_() if node["requires_grad"] else t
    if "array" in node:
        return arrays[node["array"]]
    if "dict" in node:
        return {
            _decode(k, arrays, map_location): _decode(v, arrays, map_location)
            for k, v in node["dict"]
        }
    if "list" in node:
        return [_decode(v, arrays, map_location) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, arrays, map_location) for v in node["tuple"])
    return node["value"]
