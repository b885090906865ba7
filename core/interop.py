"""Exchange with other array libraries through DLPack, without a copy.

>>> import numpy as np, gradmesh.core as gm
>>> a = np.arange(3.0)
>>> t = gm.from_dlpack(a)
>>> t.add_(1); a.tolist()
tensor([1., 2., 3.], dtype=gradmesh.float64)
[1.0, 2.0, 3.0]
"""

from __future__ import annotations

import numpy as np

from . import backend, dtypes
from .tensor import Tensor

__all__ = ["from_dlpack"]

_CPU, _CUDA = 1, 2  # DLPack's device types (kDLCPU, kDLCUDA)


def from_dlpack(ext) -> Tensor:
    """A tensor sharing memory with ``ext``, any object with ``__dlpack__`` (a torch tensor,
    a NumPy or CuPy array, a JAX array...); CPU memory becomes a NumPy-backed tensor and
    CUDA memory a CuPy-backed one."""
    if isinstance(ext, Tensor):
        return ext
    if not hasattr(ext, "__dlpack_device__"):
        raise TypeError(
            f"from_dlpack: expected an object with __dlpack__ and "
            f"__dlpack_device__, got {type(ext).__name__}"
        )
    bits = torch_bfloat16_as_numpy(ext)
    if bits is not ext:
        return Tensor(bits)
    kind = int(ext.__dlpack_device__()[0])
    if kind == _CPU:
        return Tensor(_numpy_from_dlpack(ext))
    if kind == _CUDA:
        return Tensor(backend.cupy().from_dlpack(ext))
    raise RuntimeError(
        f"from_dlpack: unsupported device type {kind}; gradmesh takes CPU and CUDA memory"
    )


def _numpy_from_dlpack(ext) -> np.ndarray:
    try:
        return np.from_dlpack(ext)
    except RuntimeError as e:
        if "dtype" not in str(e):
            raise
        # NumPy takes only its own dtypes through DLPack: bfloat16 is not one of them.
        raise BufferError(
            f"from_dlpack: NumPy cannot import this dtype ({e}); for a bfloat16 tensor share "
            f"its bits instead: gm.from_numpy(t.view(torch.int16).numpy().view("
            f"ml_dtypes.bfloat16))"
        ) from None


def torch_bfloat16_as_numpy(data):
    """A torch bfloat16 tensor as a NumPy bfloat16 array over the same memory (torch's own
    ``numpy()`` and DLPack refuse the dtype, so through its bits as int16); anything else
    is returned as it is. One that requires grad is refused with ``numpy()``'s error, as
    a float32 one is (the int16 view would not require grad); torch's own errors stand for
    the rest (a tensor on a GPU)."""
    if str(getattr(data, "dtype", "")) != "torch.bfloat16" or not hasattr(data, "view"):
        return data
    import torch  # only reached with a torch tensor in hand

    if data.requires_grad:  # its int16 view would not: refuse as numpy() does
        raise RuntimeError(
            "Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead."
        )
    return data.view(torch.int16).numpy().view(dtypes.bfloat16.np)
