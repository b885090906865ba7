"""Array modules: NumPy on the CPU, CuPy on CUDA devices."""

from __future__ import annotations

import numpy as np

_cupy = None


def cupy():
    """The CuPy module, imported on first use; a clear error where it is not installed."""
    global _cupy
    if _cupy is None:
        try:
            import cupy as cp
        except ImportError as e:
            raise RuntimeError("the cuda backend needs CuPy: pip install 'gradmesh[cuda]'") from e
        _cupy = cp
    return _cupy


def cuda_available() -> bool:
    try:
        return cupy().cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def xp_of(array):
    """The array module that owns ``array``."""
    if type(array) is np.ndarray:
        return np
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy
    return np


def xp_for(device: str):
    return cupy() if device_type(device) == "cuda" else np


def device_type(device) -> str:
    name = "cpu" if device is None else str(device)
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected 'cpu' or 'cuda'")
    return kind


def device_of(array) -> str:
    return "cpu" if xp_of(array) is np else "cuda"


def to_numpy(array) -> np.ndarray:
    return (
        array
        if type(array) is np.ndarray
        else (array.get() if xp_of(array) is not np else np.asarray(array))
    )
