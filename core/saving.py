"""``gradmesh.core.save`` / ``load``: state dicts in a safetensors file, never pickle.

The file is a plain `safetensors <https://github.com/huggingface/safetensors>`_ file:
every tensor (or array) is one named tensor, and the structure around them (dicts,
lists, tuples, numbers, strings, None) is JSON in the header's ``__metadata__`` under
the key ``gradmesh``. A tensor is named by its path in the structure, joined with dots,
so a model's ``state_dict()`` keeps torch's keys (``0.weight``) and an optimizer's
``state_dict()`` gives ``state.0.exp_avg``. Hence ``safetensors.torch.load_file`` reads
a gradmesh file of a flat state dict into a torch state dict, and ``load`` reads what
``safetensors.torch.save_file`` wrote (a flat dict name -> Tensor). Loading builds only
those types: a file cannot run code, unlike a pickle. Files of the earlier format (a
NumPy ``.npz`` with the structure in a member ``__structure__``) still load: the first
bytes tell the formats apart.

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
import struct
from typing import Any

import numpy as np

from . import backend, dtypes
from .tensor import Tensor

__all__ = ["save", "load"]

STRUCTURE_KEY = "gradmesh"  # the __metadata__ entry that holds the JSON structure
_NPZ_STRUCTURE = "__structure__"  # the earlier format's member with the structure
_ZIP_MAGIC = b"PK\x03\x04"
# The safetensors dtypes that NumPy has, and BF16 through ml_dtypes (no FP8); little-endian.
_NUMPY_DTYPES = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in (
        ("BOOL", np.bool_), ("U8", np.uint8), ("I8", np.int8), ("U16", np.uint16),
        ("I16", np.int16), ("U32", np.uint32), ("I32", np.int32), ("U64", np.uint64),
        ("I64", np.int64), ("F16", np.float16), ("F32", np.float32), ("F64", np.float64),
        ("BF16", dtypes.bfloat16.np),
    )
}  # fmt: skip


def save(obj: Any, f) -> None:
    """Write ``obj`` (a state dict: nested dicts, lists and tuples of tensors, arrays,
    numbers, strings and None) to the path or binary file ``f`` as safetensors."""
    arrays: dict[str, np.ndarray] = {}
    structure = _encode(obj, arrays, [])
    metadata = {"format": "pt", STRUCTURE_KEY: json.dumps(structure)}
    import safetensors.numpy  # here: the servers never save, and their image lacks it

    data = safetensors.numpy.save(arrays, metadata=metadata)
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as out:
            out.write(data)
    else:
        f.write(data)


def load(f, map_location=None, weights_only: bool = True) -> Any:
    """Read what ``save`` (or ``safetensors.torch.save_file``) wrote; tensors land on
    ``map_location`` (default: the CPU). ``weights_only`` is accepted for torch's
    signature: nothing else can be loaded."""
    name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "<file>")
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as src:
            data = src.read()
    else:
        data = f.read()
    if data[:4] == _ZIP_MAGIC:
        structure, arrays = _read_npz(data)
    else:
        structure, arrays = _read_safetensors(data, name)
    if structure is None:  # written by another safetensors writer: a flat state dict
        return {k: _foreign_tensor(k, a, map_location, name) for k, a in arrays.items()}
    return _decode(structure, arrays, map_location, name)


def _load_arrays(data: bytes) -> dict[str, np.ndarray]:
    """``safetensors.numpy.load``, which knows no BF16: read-only views of ``data``."""
    import safetensors

    return {
        key: np.frombuffer(view["data"], dtype=_NUMPY_DTYPES[view["dtype"]]).reshape(view["shape"])
        for key, view in safetensors.deserialize(data)
    }


def _read_safetensors(data: bytes, name: str) -> tuple[Any, dict]:
    header = _header(data, name)
    metadata = header.get("__metadata__") or {}
    for key, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if key != "__metadata__" and dtype not in _NUMPY_DTYPES:
            raise ValueError(
                f"load: {name}: tensor {key!r} has dtype {dtype}, which NumPy (and so "
                f"gradmesh) cannot hold; convert it before saving (e.g. tensor.float())"
            )
    import safetensors  # here: the servers never load files, and their image lacks it

    try:
        arrays = _load_arrays(data)
    except (safetensors.SafetensorError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"load: {name}: not a readable safetensors file ({e})") from None
    text = metadata.get(STRUCTURE_KEY)
    if text is None:
        return None, arrays
    try:
        return json.loads(text), arrays
    except json.JSONDecodeError as e:
        where = f"__metadata__[{STRUCTURE_KEY!r}]"
        raise ValueError(f"load: {name}: {where} is not JSON ({e})") from None


def _header(data: bytes, name: str) -> dict:
    """The JSON header: 8 bytes of little-endian length, then that many bytes of JSON."""
    if len(data) < 8:
        raise ValueError(
            f"load: {name}: {len(data)} bytes is too short for a safetensors file "
            f"(truncated, or not written by gm.save / safetensors)"
        )
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError(
            f"load: {name}: the header claims {size} bytes but the file has "
            f"{len(data) - 8} after the length (truncated, or not a safetensors file)"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"load: {name}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"load: {name}: the safetensors header is not a JSON object")
    return header


def _read_npz(data: bytes) -> tuple[Any, dict]:
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        structure = json.loads(bytes(npz[_NPZ_STRUCTURE]).decode())
        arrays = {k: npz[k] for k in npz.files if k != _NPZ_STRUCTURE}
    return structure, arrays


def _key(path: list[str], arrays: dict) -> str:
    # The path names the tensor as torch would; a clash (a key "a.b" next to a["b"])
    # gets a suffix rather than overwriting.
    base = ".".join(path) or "tensor"
    key, n = base, 1
    while key in arrays:
        key, n = f"{base}.{n}", n + 1
    return key


def _c_order(a: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it makes a 0-d array (num_batches_tracked) 1-d.
    return np.asarray(a, order="C")


def _encode(obj, arrays: dict, path: list[str]) -> Any:
    if isinstance(obj, Tensor):
        key = _key(path, arrays)
        arrays[key] = _c_order(backend.to_numpy(obj._data))
        return {"tensor": key, "requires_grad": bool(obj.requires_grad)}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"save: cannot store an object array at {'.'.join(path)!r}")
        key = _key(path, arrays)
        arrays[key] = _c_order(obj)
        return {"array": key, "requires_grad": False}
    if isinstance(obj, dict):
        return {
            "dict": [
                [_encode(k, arrays, path), _encode(v, arrays, path + [str(k)])]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, arrays, path + [str(i)]) for i, v in enumerate(obj)]
        return {type(obj).__name__: items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, np.generic):
        return {"value": obj.item()}
    raise TypeError(
        f"save: cannot store a {type(obj).__name__}; a state dict holds tensors, "
        f"arrays, numbers, strings, None and dicts/lists/tuples of them"
    )


def _tensor(array: np.ndarray, requires_grad: bool, map_location) -> Tensor:
    t = Tensor(array)
    if map_location is not None:
        t = t.to(str(map_location))
    return t.requires_grad_() if requires_grad else t


def _foreign_tensor(key: str, array: np.ndarray, map_location, name: str) -> Tensor:
    try:
        return _tensor(array, False, map_location)
    except TypeError as e:  # a dtype NumPy has and gradmesh has not (uint8, int16...)
        raise ValueError(f"load: {name}: tensor {key!r}: {e}") from None


def _decode(node: dict, arrays: dict, map_location, name: str) -> Any:
    def array(key) -> np.ndarray:
        if key not in arrays:
            raise ValueError(f"load: {name}: the structure names a tensor {key!r} not in the file")
        return arrays[key]

    def walk(node) -> Any:
        if not isinstance(node, dict):
            raise ValueError(f"load: {name}: malformed structure node {node!r}")
        if "tensor" in node:
            grad = bool(node.get("requires_grad"))
            return _tensor(array(node["tensor"]), grad, map_location)
        if "array" in node:
            return array(node["array"])
        if "dict" in node:
            return {walk(k): walk(v) for k, v in node["dict"]}
        if "list" in node:
            return [walk(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(walk(v) for v in node["tuple"])
        if "value" in node:
            return node["value"]
        raise ValueError(f"load: {name}: malformed structure node {node!r}")

    return walk(node)
